"""EMIT: selection → OUT/shards/ (kept samples, byte for byte), then the manifest, the index and
`_SUCCESS`, written last as the commit point of the whole run (`outputs.manifest.commit`).

Emit never decodes a payload: it streams each input shard again and copies every member of a
kept sample, adding the sample's score (`<key>.sage.json` in tar, `sage_*` columns in Parquet).
Every output object is written under a temporary name and moved into place when complete, and
each emitted shard leaves a marker in OUT/_work/, so a rerun emits only what is missing.
"""

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..config import Config, shard_options
from ..errors import ShardError
from ..formats import copy_selected
from ..outputs import manifest
from ..outputs.folder import OutputFolder, output_of
from ..outputs.identity import run_config
from ..outputs.selection_file import selection_file
from ..outputs.tables import annotations, errored_count, read_part
from ..progress import Progress
from ..sample import ShardRef

log = logging.getLogger("sage_stream")


@dataclass
class EmitResult:
    out: str
    totals: dict[str, int]
    outputs: list[dict[str, Any]]
    seconds: float


@dataclass(frozen=True)
class EmitJob:
    """One shard to emit: the selection it emits (by digest), the scorer that chose it, its
    done-marker. The kept keys are read where the job runs, from the shard's own row group of
    selection.parquet, so the driver never holds them."""

    ref: ShardRef
    selection: str  # digest of selection.parquet
    scorer: str
    marker: str

    def kept(self, folder: OutputFolder) -> frozenset[str]:
        return selection_file(folder, self.selection).keys(self.ref.name)


# How an executor runs emit jobs: counts of each job, yielded in the order of the jobs.
EmitJobs = Callable[[Config, list[EmitJob]], Iterable[dict[str, Any]]]


def _shard_counts(ref: ShardRef, part: pa.Table, kept: int, error: str | None,
                  emitted: bool) -> dict[str, Any]:  # fmt: skip
    errored = errored_count(part)
    return {"name": ref.name, "url": ref.url, "format": ref.format, "emitted": emitted,
            "seen": part.num_rows, "scored": part.num_rows - errored, "errored": errored,
            "kept": kept, "shard_error": error}  # fmt: skip


def emit_shard(cfg: Config, job: EmitJob) -> dict[str, Any]:
    """Write OUT/shards/<name> with the kept samples of the job's shard; returns its counts.

    A shard that cannot be read again is fine only if pass 2 already recorded it as broken and
    nothing of it is kept: then there is no output shard for it, and the manifest says so.
    """
    folder, ref = output_of(cfg), job.ref
    part, error = read_part(folder, ref.name)
    keep = annotations(part, job.kept(folder), job.scorer)
    try:
        with folder.writer(folder.shard(ref.name)) as f:
            written = copy_selected(
                ref, f, keep, cfg.storage_options, **shard_options(cfg, ref.format)
            )
    except ShardError:
        if error is None or keep:
            raise
        log.warning("%s: unreadable and nothing kept: no output shard", ref.name)
        return _shard_counts(ref, part, 0, error, emitted=False)
    if written != len(keep):  # the shard changed since it was scored: its scores are stale
        raise ShardError(
            ref.url,
            f"{len(keep)} kept samples were scored but {written} found when copying; "
            "was the shard rewritten? score it again (--overwrite)",
        )
    return _shard_counts(ref, part, written, error, emitted=True)


def emit_marked(cfg: Config, job: EmitJob) -> dict[str, Any]:
    """Emit one shard, then its marker: a shard with a marker is never emitted again."""
    counts = emit_shard(cfg, job)
    output_of(cfg).write_json(job.marker, counts)
    return counts


def run_emit(
    cfg: Config, refs: list[ShardRef], sketch_stats: dict | None, emit_jobs: EmitJobs
) -> EmitResult:
    """Emit every shard not yet emitted for this selection (`emit_jobs` says where), then the
    manifest, the index and `_SUCCESS`, in that order."""
    folder = output_of(cfg)
    digest = folder.selection_hash()
    params = selection_file(folder, digest).params
    scorer = params.get("scorer", cfg.scorer)
    progress = Progress("emit", len(refs), cfg.progress)
    shards = {r.name: folder.read_json(folder.emitted_marker(digest, r.name)) for r in refs}
    for ref in refs:  # shards emitted before a restart count as done at once
        if shards[ref.name] is not None:
            progress.advance(shards[ref.name]["kept"])
            progress.shard_done(ref.name)
    todo = [r for r in refs if shards[r.name] is None]
    jobs = [EmitJob(r, digest, scorer, folder.emitted_marker(digest, r.name)) for r in todo]
    for ref, counts in zip(todo, emit_jobs(cfg, jobs), strict=True):
        shards[ref.name] = counts
        progress.advance(counts["kept"])
        progress.shard_done(ref.name)
    seconds = progress.close()
    config = folder.recorded_config()
    if config is None:  # this command is all there is to go by
        config = run_config(cfg)
    ordered = [shards[r.name] for r in refs]
    written = manifest.commit(folder, ordered, params, config, sketch_stats)
    return EmitResult(cfg.out, written["totals"], written["outputs"], seconds)
