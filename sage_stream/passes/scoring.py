"""Pass 2: shards → per-sample gradients → agreement scores → scores/part-<shard>.parquet.

Every input sample gets exactly one row, status "ok" with its score or "error" with a reason,
so that seen = scored + errored holds. With `--consensus centroid` the sketch coordinates
z = B g go to the sketch store first (float16) and are scored once every z is known.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from ..batches import Batch, Skipped
from ..errors import SampleError, ShardError
from ..progress import Progress
from ..sample import ShardRef
from ..scores import NONFINITE_LOSS, ScoredBatch, score_batch
from ..storage import exists, join
from ..store import StoredSketch, write_projections
from ..tables import SCORE_COLUMNS, errored_count, part_url, read_part, write_scores
from .centroid import rescore_with_centroids
from .context import StageContext

log = logging.getLogger("sage_stream")


@dataclass
class ShardScores:
    """One shard's rows as they arrive; ordered by position in the shard when written."""

    shard: str
    rows: dict[str, list] = field(default_factory=lambda: {c: [] for c in SCORE_COLUMNS})
    index: list[int] = field(default_factory=list)
    z: list[torch.Tensor] = field(default_factory=list)  # (n, ℓ) pieces, centroid only

    def add_skipped(self, item: Skipped, ell: int | None) -> None:
        self._add(item.key, item.index, item.label, None, None, None, None, item.reason)
        if ell is not None:
            self.z.append(torch.zeros(1, ell))

    def add_batch(self, batch: Batch, scored: ScoredBatch) -> None:
        columns = [
            [None if v != v else v for v in t.tolist()]  # NaN -> null
            for t in (scored.score, scored.loss, scored.grad_norm, scored.energy)
        ]
        labels = batch.y.tolist()
        for i, key in enumerate(batch.keys):
            score, loss, gnorm, energy = (c[i] for c in columns)
            self._add(
                key, batch.indices[i], labels[i], score, loss, gnorm, energy, scored.reasons[i]
            )
        if scored.z is not None:
            self.z.append(scored.z)

    def _add(
        self,
        key: str,
        index: int,
        label: int | None,
        score: float | None,
        loss: float | None,
        gnorm: float | None,
        energy: float | None,
        reason: str | None,
    ) -> None:
        values = (key, self.shard, label, score, loss, gnorm, energy)
        for column, value in zip(SCORE_COLUMNS[:7], values, strict=True):
            self.rows[column].append(value)
        self.rows["status"].append("ok" if reason is None else "error")
        self.rows["reason"].append(reason)
        self.index.append(index)

    def order(self) -> list[int]:
        return sorted(range(len(self.index)), key=self.index.__getitem__)

    def table(self) -> pa.Table:
        order = self.order()
        return pa.table({c: [v[i] for i in order] for c, v in self.rows.items()})

    def projections(self) -> torch.Tensor:
        z = torch.cat(self.z) if self.z else torch.zeros(0, 0)
        return z[self.order()]


def _sketch_tensors(
    ctx: StageContext, sketch: StoredSketch | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if sketch is None:
        return None
    dev = ctx.device
    return sketch.sigma.to(dev), sketch.basis.to(dev), sketch.consensus.to(dev)


def score_shard(
    ctx: StageContext, ref: ShardRef, sketch: StoredSketch | None, progress: Progress
) -> tuple[ShardScores, str | None]:
    """Score one shard; returns its rows and the shard-level error, if its stream broke."""
    centroid = sketch is not None and ctx.cfg.consensus == "centroid"
    ell = sketch.sigma.shape[0] if centroid else None
    tensors = _sketch_tensors(ctx, sketch)
    rows = ShardScores(ref.name)
    try:
        for item in ctx.batches(ref):
            if isinstance(item, Skipped):
                rows.add_skipped(item, ell)
                progress.advance(1)
                continue
            try:
                feats = ctx.features(ref, item)
            except SampleError as exc:
                if ctx.cfg.on_error == "fail":
                    raise
                for key, index, label in zip(item.keys, item.indices, item.y.tolist(), strict=True):
                    rows.add_skipped(Skipped(key, index, exc.reason, label), ell)
                progress.advance(len(item.keys))
                continue
            y = item.y.to(ctx.device)
            scored = score_batch(feats.grads, feats.loss, y, tensors, keep_z=centroid)
            if ctx.cfg.on_error == "fail" and NONFINITE_LOSS in scored.reasons:
                key = item.keys[scored.reasons.index(NONFINITE_LOSS)]
                raise SampleError(ref.name, key, NONFINITE_LOSS, ref.url)
            rows.add_batch(item, scored)
            progress.advance(len(item.keys))
    except ShardError as exc:
        if ctx.cfg.on_error == "fail":
            raise
        log.warning("pass 2: the rest of %s is lost: %s", ref.name, exc.reason)
        return rows, exc.reason
    return rows, None


@dataclass
class ScoreResult:
    url: str
    seen: int
    scored: int
    errored: int
    shard_errors: list[dict[str, str]]
    seconds: float


def score_and_write(
    ctx: StageContext, ref: ShardRef, sketch: StoredSketch | None, progress: Progress
) -> tuple[pa.Table, str | None]:
    """Score one shard and write its part (after its projections, for centroid consensus)."""
    cfg = ctx.cfg
    rows, error = score_shard(ctx, ref, sketch, progress)
    table = rows.table()
    if sketch is not None and cfg.consensus == "centroid":
        store_url = join(cfg.out, "sketch.zarr")
        # unit rows: centroid scoring needs only directions, and raw z (σ grows like √N·‖g‖)
        # would overflow float16 at scale
        unit = torch.nn.functional.normalize(rows.projections(), dim=1)
        write_projections(store_url, ref.name, unit, cfg.storage_options)
    write_scores(part_url(cfg.out, ref.name), table, error, cfg.storage_options)
    return table, error


def run_score_pass(ctx: StageContext, sketch: StoredSketch | None) -> ScoreResult:
    """Pass 2 over every shard that has no scores part yet (a part that exists is complete).

    With centroid consensus, the scores are filled in afterwards from the stored z.
    """
    cfg = ctx.cfg
    progress = Progress("pass 2 (score)", len(ctx.refs), cfg.progress)
    seen = scored = 0
    shard_errors: list[dict[str, str]] = []
    for ref in ctx.refs:
        if exists(part_url(cfg.out, ref.name), cfg.storage_options):
            table, error = read_part(cfg.out, ref.name, ["status"], cfg.storage_options)
        else:
            table, error = score_and_write(ctx, ref, sketch, progress)
        if error is not None:
            shard_errors.append({"shard": ref.name, "url": ref.url, "reason": error})
        seen += table.num_rows
        scored += table.num_rows - errored_count(table)
        progress.shard_done(ref.name)
    if sketch is not None and cfg.consensus == "centroid":
        ell = sketch.sigma.shape[0]
        scored = rescore_with_centroids(cfg, ctx.refs, ctx.num_classes, ell)
    seconds = progress.close()
    return ScoreResult(join(cfg.out, "scores"), seen, scored, seen - scored, shard_errors, seconds)
