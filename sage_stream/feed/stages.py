"""The feed as plain webdataset stages: samples in, kept samples with scores out."""

import json
import logging
import math
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from ..errors import SampleError, ShardError
from ..formats import read_shard
from ..formats.tar import SAGE_FIELD
from ..outputs.folder import OutputFolder
from ..outputs.tables import annotations, read_part
from ..sample import Sample
from .plan import RANKED_BY, FeedPlan, FeedShard, plan_feed

log = logging.getLogger("sage_stream")


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
    if shard.kept is not None and not shard.kept.count:
        return  # nothing kept: the shard is not read at all
    records = None
    if shard.kept is not None:
        part, _ = read_part(OutputFolder(plan.out, storage_options or {}), ref.name)
        records = annotations(part, shard.kept.load(), plan.scorer)
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
        if shard.kept is not None and shard.kept.count:
            part, _ = read_part(OutputFolder(out, storage_options or {}), shard.ref.name)
            for key, record in annotations(part, shard.kept.load(), plan.scorer).items():
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
    """The value the run's scorer ranked on (score, loss or grad-norm); for sage-coverage, whose
    ranking is a seeded draw, the agreement it filtered on; NaN for random."""
    name = RANKED_BY.get(record.get("scorer") or "sage")
    value = record.get(name) if name else None
    return math.nan if value is None else float(value)
