"""Training feed: the kept samples of a run, streamed into a training loop (after EMIT).

Two sources give one and the same stream of samples:

- **emitted**: ``OUT/shards/*`` as listed by ``OUT/manifest.json`` (or ``shardindex.json``, or
  the folder); each sample's score record is its ``<key>.sage.json`` member or ``sage_*``
  columns, moved into ``sample["sage"]``.
- **original**: the input shards (``manifest.json`` ``inputs[].url``, or given) filtered by
  ``OUT/selection.parquet``; no data is rewritten. The record is built from ``scores/`` exactly
  as emit builds it, so both sources yield equal samples.

A sample is a webdataset-style dict: ``__key__``, ``__url__``, ``__shard__``, the fields (raw
member bytes for tar, column values for Parquet) and ``sage`` = ``{score, label, loss,
grad_norm, energy, scorer}``. ``filter_selected`` and ``attach_scores`` are the same steps as
plain webdataset stages. ``SelectedDataset`` splits shards over nodes and DataLoader workers
so that every kept sample comes out exactly once per epoch across all of them.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import make_decoder
from .emit import annotations
from .errors import InputError, SageError, SampleError, ShardError
from .formats import read_shard
from .formats.tar import SAGE_FIELD
from .sample import Sample, ShardRef
from .storage import filesystem, join
from .tables import read_part, read_selection
from .urls import expand_inputs, shard_format

log = logging.getLogger("sage_stream")
ON_ERROR = ("raise", "skip")
# The record entry each scorer ranked on (random leaves none behind: its value is a hash).
RANKED_BY = {"sage": "score", "loss": "loss", "loss-easy": "loss", "grad-norm": "grad_norm"}


@dataclass(frozen=True)
class FeedShard:
    ref: ShardRef
    kept: frozenset[str] | None  # original source: the keys to keep; None: emitted (all kept)
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


def _read_json(url: str, storage_options: dict | None) -> Any:
    if not _exists(url, storage_options):
        return None
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def _exists(url: str, storage_options: dict | None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def _ref(url: str) -> ShardRef:
    return ShardRef(url=url, name=posixpath.basename(url.rstrip("/")), format=shard_format(url))


def _resolve(out: str, url: str) -> str:
    return url if "://" in url or url.startswith("/") else join(out, url)


def _emitted(out: str, manifest: dict | None, storage_options: dict | None) -> list[FeedShard]:
    """Output shards from the manifest, else the wids index, else a listing of OUT/shards."""
    if manifest is not None:
        listed = [(o["url"], o["samples"]) for o in manifest["outputs"]]
    elif (index := _read_json(join(out, "shardindex.json"), storage_options)) is not None:
        listed = [(s["url"], s.get("nsamples")) for s in index["shardlist"]]
    else:
        refs = expand_inputs([join(out, "shards")], storage_options)
        return [FeedShard(r, None, None) for r in refs]
    return [FeedShard(_ref(_resolve(out, url)), None, n) for url, n in listed]


def _original(
    out: str, manifest: dict | None, inputs: Any, storage_options: dict | None
) -> tuple[list[FeedShard], str]:
    """Input shards with the kept keys of each, from OUT/selection.parquet."""
    if inputs is not None:
        refs = expand_inputs([inputs] if isinstance(inputs, str) else list(inputs), storage_options)
    elif manifest is not None:
        refs = [ShardRef(i["url"], i["name"], i["format"]) for i in manifest["inputs"]]
    else:
        raise InputError(f"{out} has no manifest.json: pass the input shards (inputs=...)")
    selection, params = read_selection(out, storage_options)
    kept: dict[str, set[str]] = {}
    for shard, key in zip(
        selection["__shard__"].to_pylist(), selection["__key__"].to_pylist(), strict=True
    ):
        kept.setdefault(shard, set()).add(key)
    unknown = sorted(set(kept) - {r.name for r in refs})
    if unknown:
        raise InputError(
            f"{out}/selection.parquet keeps samples of shards not in the inputs: {unknown[:5]}"
        )
    shards = [
        FeedShard(r, frozenset(kept.get(r.name, ())), len(kept.get(r.name, ()))) for r in refs
    ]
    return shards, params.get("scorer", "sage")


def plan_feed(
    out: str,
    *,
    original: bool = False,
    inputs: str | Sequence[str] | None = None,
    storage_options: dict | None = None,
) -> FeedPlan:
    """The shards a feed of run ``out`` reads: its emitted shards, or (``original=True`` or
    ``inputs`` given) the input shards filtered by its selection."""
    manifest = _read_json(join(out, "manifest.json"), storage_options)
    if manifest is not None and not _exists(join(out, "_SUCCESS"), storage_options):
        raise InputError(f"{out} is not a finished run (no _SUCCESS): let the run complete")
    config = (manifest or {}).get("config", {})
    reader = {
        "tar": {"max_member_bytes": config.get("max_member_bytes", 256 * 2**20)},
        "parquet": {"key_column": config.get("key_column", "__key__")},
    }
    if original or inputs is not None:
        shards, scorer = _original(out, manifest, inputs, storage_options)
    else:
        shards = _emitted(out, manifest, storage_options)
        scorer = (manifest or {}).get("selection", {}).get("scorer", "sage")
    return FeedPlan(out, tuple(shards), scorer, config, reader)


def _as_dict(sample: Sample, url: str) -> dict[str, Any]:
    return {"__key__": sample.key, "__url__": url, "__shard__": sample.shard, **sample.fields}


def _pop_record(sample: dict[str, Any]) -> dict[str, Any]:
    """Move an emitted sample's score record (``sage.json`` or ``sage_*``) out of its fields."""
    where = (posixpath.basename(sample["__url__"]), sample["__key__"])
    if SAGE_FIELD in sample:
        try:
            return json.loads(sample.pop(SAGE_FIELD))
        except ValueError as e:
            raise SampleError(*where, f"unreadable {SAGE_FIELD}: {e}") from None
    record = {k[len("sage_") :]: sample.pop(k) for k in list(sample) if k.startswith("sage_")}
    if not record:
        raise SampleError(
            *where, f"no {SAGE_FIELD} member or sage_* columns: not a sage-stream output shard"
        )
    return record


def shard_samples(
    plan: FeedPlan, shard: FeedShard, storage_options: dict | None = None
) -> Iterator[dict[str, Any]]:
    """The kept samples of one shard of the plan, each with its ``sage`` record, in file order.

    Raises ShardError if the shard breaks, or holds fewer kept samples than the run recorded.
    """
    ref, options = shard.ref, plan.reader[shard.ref.format]
    if shard.kept is not None and not shard.kept:
        return  # nothing kept: the shard is not read at all
    records = None
    if shard.kept is not None:
        part, _ = read_part(plan.out, ref.name, storage_options=storage_options)
        records = annotations(part, set(shard.kept), plan.scorer)
    count = 0
    for sample in read_shard(ref, storage_options, **options):
        if sample.error is not None or (records is not None and sample.key not in records):
            continue
        item = _as_dict(sample, ref.url)
        item["sage"] = records[sample.key] if records is not None else _pop_record(item)
        count += 1
        yield item
    if shard.expected is not None and count != shard.expected:
        raise ShardError(
            ref.url,
            f"{count} kept samples found, the run recorded {shard.expected}: the shard "
            "changed since the run",
        )


def selected_samples(
    out: str,
    *,
    original: bool = False,
    inputs: str | Sequence[str] | None = None,
    storage_options: dict | None = None,
) -> Iterator[dict[str, Any]]:
    """Every kept sample of run ``out`` with its ``sage`` record, shard by shard (see module)."""
    plan = plan_feed(out, original=original, inputs=inputs, storage_options=storage_options)
    for shard in plan.shards:
        yield from shard_samples(plan, shard, storage_options)


def kept_records(out: str, *, storage_options: dict | None = None) -> dict[tuple[str, str], dict]:
    """``(shard name, key) -> score record`` of every kept sample, for ``filter_selected``."""
    plan = plan_feed(out, original=True, storage_options=storage_options)
    found: dict[tuple[str, str], dict] = {}
    for shard in plan.shards:
        if shard.kept:
            part, _ = read_part(out, shard.ref.name, storage_options=storage_options)
            for key, record in annotations(part, set(shard.kept), plan.scorer).items():
                found[(shard.ref.name, key)] = record
    return found


def filter_selected(
    samples: Iterable[dict[str, Any]], kept: Mapping[tuple[str, str], Mapping[str, Any]]
) -> Iterator[dict[str, Any]]:
    """webdataset stage: only the samples in ``kept`` (by shard name of ``__url__`` and
    ``__key__``), each given its record as ``sample["sage"]``::

        kept = kept_records("OUT")
        wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker,
                         wds.tarfile_to_samples(), partial(filter_selected, kept=kept), ...)
    """
    for sample in samples:
        record = kept.get((posixpath.basename(sample["__url__"]), sample["__key__"]))
        if record is not None:
            yield {**sample, "sage": dict(record)}


def attach_scores(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset stage for emitted tar shards: parse ``sage.json`` into ``sample["sage"]``."""
    for sample in samples:
        sample = dict(sample)
        sample["sage"] = _pop_record(sample)
        yield sample


def ranked_score(record: Mapping[str, Any]) -> float:
    """The value the run's scorer ranked on (score, loss or grad-norm); NaN for random."""
    name = RANKED_BY.get(record.get("scorer") or "sage")
    value = record.get(name) if name else None
    return math.nan if value is None else float(value)


class DecodeScored:
    """Default decode: sample dict -> ``(x, label, score)`` with the run's input/label keys.

    ``x`` is the float tensor of the built-in decoders (or of ``preprocess``), ``label`` an int,
    ``score`` the ``ranked_score`` of the sample's record. Picklable, for spawned workers.
    """

    def __init__(self, **decoder_options: Any) -> None:
        self.decoder = make_decoder(**decoder_options)

    def __call__(self, sample: Mapping[str, Any]) -> tuple[torch.Tensor, int, float]:
        fields = {k: v for k, v in sample.items() if not k.startswith("__") and k != "sage"}
        x, label = self.decoder(Sample(sample["__key__"], sample["__shard__"], fields))
        return x, label, ranked_score(sample["sage"])


def node_of(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else from torch.distributed if initialised, else (0, 1)."""
    if rank is None and world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise InputError("give both rank and world_size, or neither")
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def assigned(items: Sequence[Any], rank: int, world_size: int, worker: int, workers: int) -> list:
    """The items of one DataLoader worker on one node: every ``world_size · workers``-th,
    starting at ``rank · workers + worker``; together the parts are ``items``, each once."""
    return list(items[rank * workers + worker :: world_size * workers])


class SelectedDataset(IterableDataset):
    """The kept samples of run ``out`` as a PyTorch IterableDataset, decoded for training.

    Reads the emitted shards, or with ``original=True`` / ``inputs`` the input shards filtered
    by ``OUT/selection.parquet``. Each item is ``transform(decode(sample))``; the default
    ``decode`` gives ``(x, label, score)`` with the run's ``input_key``/``label_key`` (see
    ``DecodeScored``). Shards are split over nodes (``rank``/``world_size``, else
    torch.distributed when initialised at construction) and DataLoader workers, so each kept
    sample comes once per epoch across all of them; a worker with no shard yields nothing, so
    nodes may get unequal counts. ``shuffle`` permutes the shard order per epoch
    (``set_epoch``), the same on every node and worker. ``on_error="skip"`` logs and skips an
    undecodable sample or the rest of a broken shard instead of raising.
    """

    def __init__(
        self,
        out: str,
        *,
        original: bool = False,
        inputs: str | Sequence[str] | None = None,
        decode: Callable[[dict[str, Any]], Any] | None = None,
        transform: Callable[[Any], Any] | None = None,
        input_key: str | None = None,
        label_key: str | None = None,
        preprocess: Any = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: str = "raise",
        storage_options: dict | None = None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise InputError(f"on_error {on_error!r}: choose one of {', '.join(ON_ERROR)}")
        self.plan = plan_feed(
            out, original=original, inputs=inputs, storage_options=storage_options
        )
        self.decode = decode or self._default_decode(input_key, label_key, preprocess)
        self.transform = transform
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world_size = node_of(rank, world_size)
        self.on_error = on_error
        self.storage_options = storage_options

    def _default_decode(self, input_key, label_key, preprocess) -> DecodeScored:  # noqa: ANN001
        config = self.plan.config
        if preprocess is None and config.get("preprocess") is not None:
            raise InputError(
                f"the run decoded its samples with preprocess {config['preprocess']!r}: pass "
                "preprocess= (module:function) or decode= to decode them the same way"
            )
        return DecodeScored(
            input_key=input_key if input_key is not None else config.get("input_key"),
            label_key=label_key if label_key is not None else config.get("label_key", "cls"),
            preprocess=preprocess,
        )

    @property
    def num_samples(self) -> int | None:
        """Kept samples per epoch over all nodes and workers (None if the run did not say)."""
        return self.plan.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's shard order (with ``shuffle``); call it on every node, before
        iterating (DataLoader workers copy the dataset when an epoch's iteration starts)."""
        self.epoch = int(epoch)

    def shard_order(self) -> list[FeedShard]:
        shards = list(self.plan.shards)
        if not self.shuffle:
            return shards
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
        return [shards[i] for i in perm]

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in assigned(self.shard_order(), self.rank, self.world_size, worker, workers):
            yield from self._items(shard)

    def _items(self, shard: FeedShard) -> Iterator[Any]:
        samples = shard_samples(self.plan, shard, self.storage_options)
        while True:
            try:
                sample = next(samples, None)
                if sample is None:
                    return
                item = self.decode(sample)
            except SageError as e:
                if self.on_error == "raise":
                    raise
                log.warning("skipped in training feed: %s", e)
                if isinstance(e, ShardError):
                    return
                continue
            yield item if self.transform is None else self.transform(item)
