"""The output folder OUT: the one owner of every name under it, and of how they are written.

    OUT/
      sketch.zarr/                  pass 1 (outputs.sketch_store)
      scores/part-<shard>.parquet   pass 2 (outputs.tables), one row per input sample
      selection.parquet             select (outputs.tables)
      shards/<input shard name>     emit: the kept samples
      manifest.json                 emit (outputs.manifest)
      shardindex.json               emit: wids index of shards/
      _SUCCESS                      written last: the commit point of the whole run
      report/                       `sage-stream report`
      _work/                        a run in progress; removed once _SUCCESS is written
        run.json                    run identity (outputs.identity): a rerun with another
                                    one is refused unless --overwrite
        config.json                 the configuration the manifest records
        pass1.pt, pass1-block-*.pt  pass 1 checkpoints, O(ℓ·D + C·D)
        emitted-<selection hash>/<shard>   one marker per shard emitted for a selection

Pass 2 needs no checkpoint of its own: a scores part is written atomically, so a part that
exists is finished. An `OutputFolder` carries its URL and storage options, so the modules that
write under OUT take one object and never spell a name of their own.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError, OutputExistsError, StorageError
from ..storage import atomic_write, exists, filesystem, join, list_names, open_input, remove
from ..storage.fs import is_temporary
from ..storage.retry import RetryingReader
from .sketch_store import SketchStore

log = logging.getLogger("sage_stream")

SKETCH = "sketch.zarr"
SCORES = "scores"
SELECTION = "selection.parquet"
SHARDS = "shards"
MANIFEST = "manifest.json"
INDEX = "shardindex.json"
SUCCESS = "_SUCCESS"
REPORT = "report"
WORK = "_work"
# Everything a run writes into OUT; --overwrite removes exactly these, nothing else.
ENTRIES = (SKETCH, SCORES, SELECTION, SHARDS, MANIFEST, INDEX, SUCCESS, REPORT, WORK)
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"


@dataclass(frozen=True, eq=False)
class OutputFolder:
    """OUT, with the storage options every read and write under it needs."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    # --- names -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return join(self.url, *parts)

    @property
    def sketch(self) -> str:
        return self.path(SKETCH)

    @property
    def scores(self) -> str:
        return self.path(SCORES)

    def part(self, shard: str) -> str:
        """scores/part-<shard>.parquet: pass 2's rows of one input shard."""
        return self.path(SCORES, f"{PART_PREFIX}{shard}{PART_SUFFIX}")

    @property
    def selection(self) -> str:
        return self.path(SELECTION)

    def shard(self, name: str) -> str:
        return self.path(SHARDS, name)

    @property
    def manifest(self) -> str:
        return self.path(MANIFEST)

    @property
    def index(self) -> str:
        return self.path(INDEX)

    @property
    def success(self) -> str:
        return self.path(SUCCESS)

    @property
    def report(self) -> str:
        return self.path(REPORT)

    def sketch_store(self) -> SketchStore:
        return SketchStore(self.sketch, self.storage_options)

    def work(self, *parts: str) -> str:
        return self.path(WORK, *parts)

    def emitted_marker(self, selection_hash: str, shard: str) -> str:
        return self.work(f"emitted-{selection_hash}", shard)

    # --- reads and writes, retried (storage) ----------------------------------------------
    def exists(self, url: str) -> bool:
        return exists(url, self.storage_options)

    def open(self, url: str) -> RetryingReader:
        return open_input(url, self.storage_options)

    def writer(self, url: str):  # noqa: ANN201 - storage.atomic_write's context manager
        return atomic_write(url, self.storage_options)

    def write_bytes(self, url: str, data: bytes) -> None:
        with self.writer(url) as f:
            f.write(data)

    def read_json(self, url: str) -> Any:
        """The JSON value at `url`, or None if there is nothing there."""
        if not self.exists(url):
            return None
        with self.open(url) as f:
            return json.load(f)

    def write_json(self, url: str, value: Any) -> None:
        self.write_bytes(url, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    def remove(self, url: str) -> None:
        remove(url, self.storage_options)

    def names(self, url: str) -> list[str]:
        return list_names(url, self.storage_options)

    def save_state(self, url: str, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.write_bytes(url, buf.getvalue())

    def load_state(self, url: str) -> dict[str, Any] | None:
        """A checkpoint written by `save_state`, loaded with weights_only=True; None if absent."""
        if not self.exists(url):
            return None
        with self.open(url) as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)

    # --- the run's life cycle ----------------------------------------------------------------
    def stored_identity(self) -> dict[str, Any] | None:
        """The identity of the run OUT holds: from _work/ while in progress, else the manifest."""
        found = self.read_json(self.work("run.json"))
        if found is None:
            found = (self.read_json(self.manifest) or {}).get("identity")
        return found

    def recorded_config(self) -> dict[str, Any] | None:
        """The configuration recorded when OUT was claimed, else the earlier manifest's."""
        found = self.read_json(self.work("config.json"))
        if found is None:
            found = (self.read_json(self.manifest) or {}).get("config")
        return found

    def claim(self, identity: dict[str, Any], config: dict[str, Any], overwrite: bool) -> None:
        """Refuse to mix runs in one OUT: a different identity needs `overwrite` (which wipes)."""
        stored = self.stored_identity()
        if stored is not None and stored != identity:
            changed = sorted(
                k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k)
            )
            if not overwrite:
                raise OutputExistsError(
                    f"{self.url} holds a run with another configuration (differs in: "
                    f"{', '.join(changed)}); use another --out, or --overwrite to replace it"
                )
            log.warning("--overwrite: removing the earlier run in %s (%s)", self.url,
                        ", ".join(changed))  # fmt: skip
            self.wipe()
        self.write_json(self.work("run.json"), identity)
        self.write_json(self.work("config.json"), config)

    def wipe(self) -> None:
        for entry in ENTRIES:
            self.remove(self.path(entry))

    def is_complete(self) -> bool:
        return self.exists(self.success)

    def mark_success(self) -> None:
        self.write_bytes(self.success, b"")

    def clear_success(self) -> None:
        """Called before any step changes OUT: a run in progress is never marked complete."""
        self.remove(self.success)

    def remove_temporaries(self) -> None:
        """Delete what killed writers left behind (`<name>.tmp-<12 hex>`, see atomic_write).

        Only exact temporary names match (storage.fs.is_temporary): an input shard's name
        ends in .tar/.parquet/.pq, so `night.tmp-2024.tar` and its part are never taken.
        """
        for folder in (self.url, self.scores, self.path(SHARDS)):
            for name in self.names(folder):
                if is_temporary(name):
                    fs, path = filesystem(join(folder, name), self.storage_options)
                    fs.rm(path)

    def check_outputs(self, shards: list[dict[str, Any]]) -> None:
        """Before _SUCCESS: every shard's scores part, and every emitted shard, is there.

        ``shards`` are the manifest's shard entries (``name``, ``emitted``). Raises a
        StorageError naming each missing file, so a run never commits with a hole in it.
        """
        missing = [self.part(s["name"]) for s in shards if not self.exists(self.part(s["name"]))]
        missing += [
            self.shard(s["name"])
            for s in shards
            if s.get("emitted") and not self.exists(self.shard(s["name"]))
        ]
        if missing:
            raise StorageError(
                f"{len(missing)} output file(s) missing before _SUCCESS, not committing: "
                + ", ".join(missing)
            )

    def finish(self) -> None:
        """After _SUCCESS: the scratch of the run goes."""
        self.remove(self.work())

    def selection_hash(self) -> str:
        with self.open(self.selection) as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]

    def scored_shards(self) -> list[str]:
        """Shard names that have a scores part, sorted (for `select` without inputs)."""
        if not self.exists(self.scores):
            raise InputError(f"no scores/ under {self.url}: run `sage-stream score` first")
        return sorted(
            n[len(PART_PREFIX) : -len(PART_SUFFIX)]
            for n in self.names(self.scores)
            if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX)
        )
