"""The output folder OUT: the one owner of every name under it, and of how they are written.

    OUT/
      sketch.zarr/                  pass 1 (outputs.sketch_store)
      scores/part-<shard>.parquet   pass 2 (outputs.tables), one row per input sample
      selection.parquet             select (outputs.tables)
      duplicates.parquet            select with near-copy removal: each removed sample and
                                    the candidate it duplicates (select/dedup.py)
      decisions.parquet             select: per scores row, kept or why not, a row group per
                                    shard (outputs/decisions_file.py)
      shards/<input shard name>     emit: the kept samples
      manifest.json                 emit (outputs.manifest)
      shardindex.json               emit: wids index of shards/
      _SUCCESS                      written last: the commit point of the whole run
      report/                       `sage-stream report`
      _LEASE                        held by the one run writing OUT (outputs.lease)
      _work/                        a run in progress; removed once _SUCCESS is written
        tmp/                        every temporary of a write under OUT, before its move
        run.json                    run identity (outputs.identity): a rerun with another
                                    one is refused unless --overwrite
        config.json                 the configuration the manifest records
        stopped.json                why the last step stopped, if it failed (outputs.stopped)
        pass1-unit-<i>-of-<n>.pt    pass 1 checkpoints, one per unit (passes/sketch.py), and
        pass1-unit-<i>-of-<n>-item-<j>.pt   the states a unit hands over, O(ℓ·D + C·D) each
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
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, MismatchError, OutputExistsError, StorageError
from ..formats import format_named
from ..storage import atomic_write, exists, join, list_names, open_input, remove
from ..storage.retry import RetryingReader
from ..storage.uploads import abort_stale_uploads
from .sketch_store import SketchStore

log = logging.getLogger("sage_stream")

SKETCH = "sketch.zarr"
SCORES = "scores"
SELECTION = "selection.parquet"
DUPLICATES = "duplicates.parquet"
DECISIONS = "decisions.parquet"
SHARDS = "shards"
MANIFEST = "manifest.json"
INDEX = "shardindex.json"
SUCCESS = "_SUCCESS"
REPORT = "report"
WORK = "_work"
TMP = "tmp"  # under _work/: temporaries only
# Everything a run writes into OUT; --overwrite removes exactly these, nothing else.
ENTRIES = (SKETCH, SCORES, SELECTION, DUPLICATES, DECISIONS, SHARDS, MANIFEST, INDEX, SUCCESS,
           REPORT, WORK)  # fmt: skip
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

    @property
    def duplicates(self) -> str:
        return self.path(DUPLICATES)

    @property
    def decisions(self) -> str:
        return self.path(DECISIONS)

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

    @property
    def stopped(self) -> str:
        return self.work("stopped.json")

    def emitted_marker(self, selection_hash: str, shard: str) -> str:
        return self.work(f"emitted-{selection_hash}", shard)

    # --- reads and writes, retried (storage) ----------------------------------------------
    def exists(self, url: str) -> bool:
        return exists(url, self.storage_options)

    def open(self, url: str) -> RetryingReader:
        return open_input(url, self.storage_options)

    def writer(self, url: str):  # noqa: ANN201 - storage.atomic_write's context manager
        """All-or-nothing write of `url`; its temporary lives in _work/tmp/, never beside it."""
        return atomic_write(url, self.storage_options, scratch=self.work(TMP))

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
        import torch  # only the passes checkpoint: `inspect` and `--help` never load torch

        buf = io.BytesIO()
        torch.save(state, buf)
        self.write_bytes(url, buf.getvalue())

    def load_state(self, url: str) -> dict[str, Any] | None:
        """A checkpoint written by `save_state`, loaded with weights_only=True; None if absent."""
        if not self.exists(url):
            return None
        import torch

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
        """Refuse to mix runs in one OUT: a different identity needs `overwrite` (which wipes),
        unless no pass of the earlier run finished: then there is nothing to lose, and the run
        starts again with the new identity (one line says so)."""
        stored = self.stored_identity()
        if stored is not None and stored != identity:
            changed = sorted(
                k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k)
            )
            if overwrite:
                log.warning("--overwrite: removing the earlier run in %s (%s)", self.url,
                            ", ".join(changed))  # fmt: skip
            elif not self.finished_work():
                log.warning("%s holds a run in which no pass finished (it differs in: %s): "
                            "starting it again with this configuration", self.url,
                            ", ".join(changed))  # fmt: skip
            elif changed == ["pins"] and stored.get("pins") is not None:
                raise MismatchError(
                    f"{self.url} was made from other contents of these inputs: "
                    f"{_changed_pins(stored, identity)}; use --overwrite to score them again"
                )
            else:
                raise OutputExistsError(
                    f"{self.url} holds a run with another configuration (differs in: "
                    f"{', '.join(changed)}); use another --out, or --overwrite to replace it"
                )
            self.wipe()
        self.write_json(self.work("run.json"), identity)
        self.write_json(self.work("config.json"), config)

    def finished_work(self) -> list[str]:
        """What of OUT a finished pass wrote: a complete sketch, scores parts, a selection,
        emitted shards, a manifest. Empty for a run that stopped before any pass finished
        (pass-1 checkpoints are not finished work: they belong to that run's configuration)."""
        found = [n for n in (SELECTION, SHARDS, MANIFEST) if self.exists(self.path(n))]
        if self.exists(self.scores) and self.names(self.scores):
            found.insert(0, SCORES)
        if self.exists(self.sketch) and self.sketch_store().is_complete():
            found.insert(0, SKETCH)
        return found

    def refuse_foreign(self, inputs: Sequence[str] = ()) -> None:
        """OUT must be empty, missing, or a sage-stream output: a run never writes into a
        folder of other files (nor into an input folder), where its outputs would mix with
        them and a later run could read its selection.parquet as a shard."""
        root = _comparable(self.url)
        for spec in inputs:
            if "://" in spec and not spec.startswith("file://"):
                continue  # remote inputs: the shard check (refuse_inputs_inside) covers them
            if _comparable(spec.lstrip("@")) == root:
                raise InputError(f"--out {self.url} is an input location: choose another --out")
        names = [n for n in self.names(self.url) if not n.startswith(".")]
        foreign = sorted(set(names) - set(ENTRIES) - {"_LEASE"})  # outputs.lease.LEASE
        if foreign:
            raise InputError(
                f"--out {self.url} is not empty and not a sage-stream output (it holds "
                f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}): choose an "
                "empty or new folder"
            )

    def refuse_inputs_inside(self, refs: list[Any]) -> None:
        """Inputs may not live under OUT: --overwrite would delete them, and a run's own
        output shards would be read back as input."""
        root = _comparable(self.url)
        inside = [r.url for r in refs if (_comparable(r.url) + "/").startswith(root + "/")]
        if inside:
            raise InputError(
                f"{len(inside)} input shard(s) lie inside the output folder {self.url} (e.g. "
                f"{inside[0]}): move them, or choose another --out"
            )

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
        """Delete what killed writers left behind: all of _work/tmp/, which holds nothing
        else, and (S3) the multipart uploads still open under OUT. No name under OUT is ever
        matched against a pattern (input names are the user's: `night.tmp-2024.tar` is a
        shard like any other)."""
        self.remove(self.work(TMP))
        self.abort_stale_uploads()

    def abort_stale_uploads(self) -> None:
        """S3: abort the uploads open under OUT; only under OUT's lease (storage.uploads)."""
        abort_stale_uploads(self.url, self.storage_options)

    def check_outputs(self, shards: list[dict[str, Any]]) -> None:
        """Before _SUCCESS: every listed output is there with its listed count of samples.

        ``shards`` are the manifest's shard entries (``name``, ``format``, ``emitted``,
        ``seen``, ``kept``): the scores part has ``seen`` rows and the emitted shard ``kept``
        samples (decisions.parquet is checked by outputs/decisions_file.py). Raises a
        StorageError naming each file that is missing or differs, so a run never commits with a
        hole in it, or over what another writer left.
        """
        wrong: list[str] = []
        for s in shards:
            wrong += self._check(self.part(s["name"]), "parquet", s.get("seen"))
            if s.get("emitted"):
                wrong += self._check(self.shard(s["name"]), s.get("format", "tar"), s.get("kept"))
        if wrong:
            raise StorageError(
                f"{len(wrong)} output file(s) missing or not as listed before _SUCCESS, not "
                "committing: " + "; ".join(wrong)
            )

    def _check(self, url: str, fmt: str, count: int | None) -> list[str]:
        if not self.exists(url):
            return [f"{url} is missing"]
        if count is None:
            return []
        try:
            found = self._count(url, fmt)
        except Exception as e:  # noqa: BLE001 - any unreadable output is a wrong one
            return [f"{url} cannot be read ({type(e).__name__}: {e})"]
        return [] if found == count else [f"{url} holds {found} samples, {count} listed"]

    def _count(self, url: str, fmt: str) -> int:
        """Samples in an output file (a scores part is Parquet), as its format counts them."""
        with self.open(url) as f:
            return format_named(fmt, url).count(f)

    def finish(self) -> None:
        """After _SUCCESS: the scratch of the run goes."""
        self.remove(self.work())

    def selection_hash(self) -> str:
        digest = hashlib.sha256()
        with self.open(self.selection) as f:
            while chunk := f.read(1 << 24):  # in pieces: the file grows with the kept samples
                digest.update(chunk)
        return digest.hexdigest()[:16]

    def scored_shards(self) -> list[str]:
        """Shard names that have a scores part, sorted (for `select` without inputs)."""
        if not self.exists(self.scores):
            raise InputError(f"no scores/ under {self.url}: run `sage-stream score` first")
        return sorted(
            n[len(PART_PREFIX) : -len(PART_SUFFIX)]
            for n in self.names(self.scores)
            if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX)
        )


def _comparable(url: str) -> str:
    """A URL or path in one spelling, for asking whether one lies under another."""
    if "://" not in url:
        return os.path.realpath(url).rstrip("/")
    scheme, rest = url.split("://", 1)
    scheme = "" if scheme == "file" else scheme + "://"
    if not scheme:
        return os.path.realpath("/" + rest.lstrip("/")).rstrip("/")
    return scheme + "/".join(p for p in rest.split("/") if p)


def _changed_pins(stored: dict[str, Any], now: dict[str, Any]) -> str:
    """'a.tar (size=1 mtime=2 -> size=3 mtime=4), ...' for the inputs whose pin changed."""
    urls, before, after = now["inputs"], stored["pins"], now["pins"]
    pairs = zip(urls, before, after, strict=True)  # same inputs: only the pins differ
    changed = [f"{url.rsplit('/', 1)[-1]} ({a} -> {b})" for url, a, b in pairs if a != b]
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    shown = ", ".join(changed[:3]) + more
    return f"{len(changed)} shard(s) changed since: {shown}"


def output_of(cfg: Any) -> OutputFolder:
    """OUT of a run's `Config` (anything with `out` and `storage_options`), with the storage
    options it is read and written with."""
    return OutputFolder(cfg.out, cfg.storage_options)
