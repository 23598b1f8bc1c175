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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor

from .errors import InputError, MismatchError
from .storage import filesystem

FORMAT_VERSION = 1
COLUMN_CHUNK = 8192  # basis chunks are ℓ × 8192 float32: 8 MiB at ℓ = 256


@dataclass
class StoredSketch:
    sigma: Tensor  # (ℓ,) float32
    basis: Tensor  # (ℓ, D) float32
    consensus: Tensor  # (C, ℓ) float32
    class_counts: Tensor  # (C,) int64
    identity: dict[str, Any]
    stats: dict[str, Any]


def open_group(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    """zarr accepts storage_options only with a remote URL, and no `file://` URLs at all."""
    fs, path = filesystem(url, storage_options)
    if "file" in fs.protocol or "local" in fs.protocol:
        return zarr.open_group(path, mode=mode, zarr_format=3)
    if storage_options:
        return zarr.open_group(url, mode=mode, zarr_format=3, storage_options=storage_options)
    return zarr.open_group(url, mode=mode, zarr_format=3)


def _put(group: zarr.Group, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
    if data.size:
        array[...] = data


def write_sketch(
    url: str,
    *,
    sigma: Tensor,
    basis: Tensor,
    consensus: Tensor,
    class_counts: Tensor,
    identity: dict[str, Any],
    stats: dict[str, Any],
    storage_options: dict | None = None,
) -> None:
    """Write the finished sketch; status turns "complete" only after every array is in."""
    group = open_group(url, "w", storage_options)
    group.attrs.update({"format_version": FORMAT_VERSION, "status": "in-progress"})
    ell, dim = basis.shape
    _put(group, "basis", basis.float().cpu().numpy(), (ell, min(dim, COLUMN_CHUNK)))
    _put(group, "singular_values", sigma.float().cpu().numpy(), (ell,))
    _put(group, "consensus", consensus.float().cpu().numpy(), consensus.shape)
    _put(group, "class_counts", class_counts.to(torch.int64).cpu().numpy(), class_counts.shape)
    group.attrs.update({"identity": identity, "stats": stats, "status": "complete"})


def read_sketch(
    url: str, *, expected: dict[str, Any] | None = None, storage_options: dict | None = None
) -> StoredSketch:
    """Open a complete sketch; with `expected`, refuse one whose identity differs."""
    try:
        group = open_group(url, "r", storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise InputError(f"no sketch at {url}: run `sage-stream sketch` first") from None
    attrs = dict(group.attrs)
    if attrs.get("format_version") != FORMAT_VERSION or attrs.get("status") != "complete":
        raise InputError(f"the sketch at {url} is not complete (status {attrs.get('status')!r})")
    if expected is not None:
        check_identity(url, attrs["identity"], expected)
    return StoredSketch(
        sigma=torch.from_numpy(group["singular_values"][...]),
        basis=torch.from_numpy(group["basis"][...]),
        consensus=torch.from_numpy(group["consensus"][...]),
        class_counts=torch.from_numpy(group["class_counts"][...]),
        identity=attrs["identity"],
        stats=attrs["stats"],
    )


def check_identity(url: str, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    diffs = [
        f"{k}: stored {stored.get(k)!r}, now {expected.get(k)!r}"
        for k in sorted(set(stored) | set(expected))
        if stored.get(k) != expected.get(k)
    ]
    if diffs:
        raise MismatchError(
            f"the sketch at {url} was made with another model or configuration "
            f"({'; '.join(diffs)}); re-run `sage-stream sketch` or use another --out"
        )


def write_projections(url: str, shard: str, z: Tensor, storage_options: dict | None = None) -> None:
    """Store one shard's z = B g (n×ℓ) as float16, for centroid consensus and re-scoring."""
    group = open_group(url, "a", storage_options)
    data = z.to(torch.float16).cpu().numpy()
    proj = group.require_group("projections")
    if f"part-{shard}" in proj:
        del proj[f"part-{shard}"]
    _put(proj, f"part-{shard}", data, (max(1, data.shape[0]), data.shape[1]))


def read_projections(url: str, shard: str, storage_options: dict | None = None) -> Tensor:
    group = open_group(url, "r", storage_options)
    return torch.from_numpy(group[f"projections/part-{shard}"][...])
