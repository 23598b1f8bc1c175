"""Which shards a feed reads, in what order, and which of their keys were kept."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import shard_options
from ..errors import InputError
from ..formats import FORMATS
from ..inputs import expand_inputs, shard_format
from ..outputs.folder import SHARDS, OutputFolder
from ..outputs.selection_file import SelectionFile
from ..sample import ShardRef
from ..storage import join

log = logging.getLogger("sage_stream")


ON_ERROR = ("raise", "skip")
# The record entry each scorer ranked on (random leaves none behind: its value is a hash).
RANKED_BY = {
    "sage-coverage": "score",
    "sage": "score",
    "loss": "loss",
    "loss-easy": "loss",
    "grad-norm": "grad_norm",
}


@dataclass(frozen=True)
class KeptKeys:
    """The kept keys of one input shard, read from its row group of selection.parquet only
    when the shard is opened (a plan of 10^5 shards holds no keys)."""

    out: str
    shard: str
    count: int
    storage_options: Mapping[str, Any]

    def load(self) -> frozenset[str]:
        if not self.count:
            return frozenset()
        folder = OutputFolder(self.out, dict(self.storage_options))
        return SelectionFile(folder).keys(self.shard)


@dataclass(frozen=True)
class FeedShard:
    ref: ShardRef
    kept: KeptKeys | None  # original source: the keys to keep; None: emitted (all kept)
    expected: int | None  # kept samples it must yield, when known


@dataclass(frozen=True)
class FeedPlan:
    """What a feed reads: the shards in a fixed order, and how to read and annotate them."""

    out: str
    shards: tuple[FeedShard, ...]
    scorer: str
    config: Mapping[str, Any]  # the run's config from manifest.json ({} without one)
    reader: Mapping[str, Any]  # per-format reader options, e.g. {"parquet": {"key_column": ...}}

    @property
    def num_samples(self) -> int | None:
        counts = [s.expected for s in self.shards]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]


def _ref(url: str) -> ShardRef:
    return ShardRef(url=url, name=posixpath.basename(url.rstrip("/")), format=shard_format(url))


def _resolve(out: str, url: str) -> str:
    return url if "://" in url or url.startswith("/") else join(out, url)


def _emitted(folder: OutputFolder, manifest: dict | None) -> list[FeedShard]:
    """Output shards from the manifest, else the wids index, else a listing of OUT/shards."""
    if manifest is not None:
        listed = [(o["url"], o["samples"]) for o in manifest["outputs"]]
    elif (index := folder.read_json(folder.index)) is not None:
        entries = index["shardlist"] + index.get("not_listed", [])  # gzipped: not for wids
        listed = [(s["url"], s.get("nsamples")) for s in entries]
    else:
        refs = expand_inputs([folder.path(SHARDS)], folder.storage_options)
        return [FeedShard(r, None, None) for r in refs]
    return [FeedShard(_ref(_resolve(folder.url, url)), None, n) for url, n in listed]


def _original(
    folder: OutputFolder, manifest: dict | None, inputs: Any
) -> tuple[list[FeedShard], str]:
    """Input shards with the kept keys of each, from OUT/selection.parquet."""
    if inputs is not None:
        listed = [inputs] if isinstance(inputs, str) else list(inputs)
        refs = expand_inputs(listed, folder.storage_options)
    elif manifest is not None:
        refs = [ShardRef(i["url"], i["name"], i["format"]) for i in manifest["inputs"]]
    else:
        raise InputError(f"{folder.url} has no manifest.json: pass the input shards (inputs=...)")
    selection = SelectionFile(folder)
    counts = selection.rows
    unknown = sorted(set(counts) - {r.name for r in refs})
    if unknown:
        raise InputError(
            f"{folder.selection} keeps samples of shards not in the inputs: {unknown[:5]}"
        )
    options = dict(folder.storage_options)
    shards = [
        FeedShard(
            r, KeptKeys(folder.url, r.name, counts.get(r.name, 0), options), counts.get(r.name, 0)
        )  # fmt: skip
        for r in refs
    ]
    return shards, selection.params.get("scorer", "sage")


def plan_feed(
    out: str,
    *,
    original: bool = False,
    inputs: str | Sequence[str] | None = None,
    storage_options: dict | None = None,
) -> FeedPlan:
    """The shards a feed of run ``out`` reads: its emitted shards, or (``original=True`` or
    ``inputs`` given) the input shards filtered by its selection."""
    folder = OutputFolder(out, storage_options or {})
    manifest = folder.read_json(folder.manifest)
    if manifest is not None and not folder.is_complete():
        raise InputError(f"{out} is not a finished run (no _SUCCESS): let the run complete")
    config = (manifest or {}).get("config", {})
    reader = {fmt: shard_options(config, fmt) for fmt in FORMATS}
    if original or inputs is not None:
        shards, scorer = _original(folder, manifest, inputs)
    else:
        shards = _emitted(folder, manifest)
        scorer = (manifest or {}).get("selection", {}).get("scorer", "sage")
    return FeedPlan(out, tuple(shards), scorer, config, reader)
