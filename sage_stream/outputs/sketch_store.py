"""The sketch store, `OUT/sketch.zarr` (zarr v3): what pass 1 leaves for pass 2.

    basis            ℓ×D  float32  V, orthonormal rows (zero rows where σ = 0)
    singular_values  ℓ    float32  σ, descending
    consensus        C×ℓ  float32  μ_c (zero row: class without consensus)
    class_counts     C    int64    samples per class that entered the sketch
    projections/part-<shard>  n×ℓ float16  z/‖z‖, z = B g, per sample (--consensus centroid)
    attrs: format_version, status, identity (model fingerprint, gradient config, D, C), stats

The identity is checked on every open: a sketch made with another model, gradient mode,
projection or ℓ is refused with the list of what differs, never used for a wrong answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import zarr

if TYPE_CHECKING:  # torch loads where tensors are read or written, not with the store
    from torch import Tensor

from ..errors import InputError, MismatchError, SageError, StorageError
from ..storage import error_text, exists, filesystem

FORMAT_VERSION = 1
COLUMN_CHUNK = 8192  # basis chunks are ℓ × 8192 float32: 8 MiB at ℓ = 256
PROJECTIONS = "projections"


@dataclass
class StoredSketch:
    sigma: Tensor  # (ℓ,) float32
    basis: Tensor  # (ℓ, D) float32
    consensus: Tensor  # (C, ℓ) float32
    class_counts: Tensor  # (C,) int64
    identity: dict[str, Any]
    stats: dict[str, Any]


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """``group[name]``, which the sketch layout makes an array (zarr types it Array | Group)."""
    return cast(zarr.Array, group[name])


def _put(group: zarr.Group, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
    if data.size:
        array[...] = data


@dataclass(frozen=True, eq=False)
class SketchStore:
    """One sketch.zarr: OUT's (`OutputFolder.sketch_store()`) or any URL (`inspect`)."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def group(self, mode: Literal["r", "a", "w"]) -> zarr.Group:
        """zarr accepts storage_options only with a remote URL, and no `file://` URLs at all."""
        fs, path = filesystem(self.url, self.storage_options)
        if "file" in fs.protocol or "local" in fs.protocol:
            return zarr.open_group(path, mode=mode, zarr_format=3)
        if self.storage_options:
            return zarr.open_group(
                self.url, mode=mode, zarr_format=3, storage_options=self.storage_options
            )
        return zarr.open_group(self.url, mode=mode, zarr_format=3)

    def write(
        self,
        *,
        sigma: Tensor,
        basis: Tensor,
        consensus: Tensor,
        class_counts: Tensor,
        identity: dict[str, Any],
        stats: dict[str, Any],
    ) -> None:
        """Write the finished sketch; status turns "complete" only after every array is in.

        A store that refuses a write (a full disk, no permission) is one StorageError line;
        the sketch stays "in-progress", so a rerun writes it again.
        """
        with _refused_as_one_line(f"the sketch {self.url}"):
            group = self.group("w")
            group.attrs.update({"format_version": FORMAT_VERSION, "status": "in-progress"})
            ell, dim = basis.shape
            _put(group, "basis", basis.float().cpu().numpy(), (ell, min(dim, COLUMN_CHUNK)))
            _put(group, "singular_values", sigma.float().cpu().numpy(), (ell,))
            _put(group, "consensus", consensus.float().cpu().numpy(), consensus.shape)
            counts = class_counts.long().cpu().numpy()
            _put(group, "class_counts", counts, class_counts.shape)
            group.attrs.update({"identity": identity, "stats": stats, "status": "complete"})

    def _complete_group(self) -> zarr.Group:
        try:
            group = self.group("r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise InputError(f"no sketch at {self.url}: run `sage-stream sketch` first") from None
        attrs = group.attrs
        if attrs.get("format_version") != FORMAT_VERSION or attrs.get("status") != "complete":
            raise InputError(
                f"the sketch at {self.url} is not complete (status {attrs.get('status')!r})"
            )
        return group

    def is_complete(self) -> bool:
        """Whether a finished sketch is there (metadata only)."""
        try:
            self._complete_group()
        except InputError:
            return False
        return True

    def read(self, *, expected: dict[str, Any] | None = None) -> StoredSketch:
        """Open a complete sketch; with `expected`, refuse one whose identity differs."""
        import torch

        group = self._complete_group()
        attrs: dict[str, Any] = dict(group.attrs)  # JSON values; these two are objects
        if expected is not None:
            self.check_identity(attrs["identity"], expected)
        return StoredSketch(
            sigma=torch.from_numpy(_array(group, "singular_values")[...]),
            basis=torch.from_numpy(_array(group, "basis")[...]),
            consensus=torch.from_numpy(_array(group, "consensus")[...]),
            class_counts=torch.from_numpy(_array(group, "class_counts")[...]),
            identity=attrs["identity"],
            stats=attrs["stats"],
        )

    def header(self, *, expected: dict[str, Any] | None = None) -> dict[str, Any]:
        """identity, stats and the shapes (ell, dim, classes) of a complete sketch, read from
        its metadata only: the basis (ℓ×D, megabytes) is not loaded. `expected` as in read."""
        group = self._complete_group()
        attrs: dict[str, Any] = dict(group.attrs)
        if expected is not None:
            self.check_identity(attrs["identity"], expected)
        ell, dim = _array(group, "basis").shape
        (classes,) = _array(group, "class_counts").shape
        return {"identity": attrs["identity"], "stats": attrs["stats"], "ell": ell, "dim": dim,
                "classes": classes}  # fmt: skip

    def class_counts(self) -> np.ndarray:
        """(C,) int64 samples per class of a complete sketch (no tensors: `inspect` uses it)."""
        return np.asarray(_array(self._complete_group(), "class_counts")[...])

    def singular_values(self) -> np.ndarray | None:
        """σ (ℓ,) float64 of a complete sketch, or None; the basis (ℓ×D) is never loaded."""
        if not exists(self.url, self.storage_options):
            return None
        try:
            group = self._complete_group()
        except InputError:
            return None
        if "singular_values" not in group:
            return None
        return np.asarray(_array(group, "singular_values")[...], dtype=np.float64)

    def check_identity(self, stored: dict[str, Any], expected: dict[str, Any]) -> None:
        diffs = [
            f"{k}: stored {stored.get(k)!r}, now {expected.get(k)!r}"
            for k in sorted(set(stored) | set(expected))
            if stored.get(k) != expected.get(k)
        ]
        if diffs:
            raise MismatchError(
                f"the sketch at {self.url} was made with another model or configuration "
                f"({'; '.join(diffs)}); re-run `sage-stream sketch` or use another --out"
            )

    def prepare_projections(self) -> None:
        """Create the projections group once, before workers racing to create it could fail."""
        self.group("a").require_group(PROJECTIONS)

    def write_projections(self, shard: str, z: Tensor) -> None:
        """Store one shard's z rows (n×ℓ) as float16, for centroid consensus and re-scoring."""
        data = z.half().cpu().numpy()
        with _refused_as_one_line(f"the projections of {shard} in {self.url}"):
            proj = self.group("a").require_group(PROJECTIONS)
            if f"part-{shard}" in proj:
                del proj[f"part-{shard}"]
            _put(proj, f"part-{shard}", data, (max(1, data.shape[0]), data.shape[1]))

    def read_projections(self, shard: str) -> Tensor:
        import torch

        return torch.from_numpy(_array(self.group("r"), f"{PROJECTIONS}/part-{shard}")[...])


@contextmanager
def _refused_as_one_line(what: str) -> Iterator[None]:
    """A store that refuses a write (a full disk, no permission) is one StorageError line."""
    try:
        yield
    except SageError:
        raise
    except OSError as e:
        raise StorageError(f"cannot write {what}: {error_text(e)}") from e
