"""Pass 2: shards → per-sample gradients → agreement and coverage → scores/part-<shard>.parquet.

Every input sample gets exactly one row, status "ok" with its score or "error" with a reason,
so that seen = scored + errored holds. With `--consensus centroid` the sketch coordinates
z = B g go to the sketch store first (float16) and are scored once every z is known.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from ..decode.batches import Batch, Skipped
from ..outputs.folder import OutputFolder
from ..outputs.sketch_store import StoredSketch
from ..outputs.tables import SCORE_COLUMNS, errored_count, read_part, write_part
from ..progress import Progress
from ..sample import ShardRef
from ..scores import ScoredBatch, SketchTensors, ridge_lambda, score_batch
from .centroid import rescore_with_centroids
from .loop import Broken, Featured, Item, StageContext

log = logging.getLogger("sage_stream")


@dataclass
class ShardScores:
    """One shard's rows as they arrive; ordered by position in the shard when written."""

    shard: str
    rows: dict[str, list] = field(default_factory=lambda: {c: [] for c in SCORE_COLUMNS})
    index: list[int] = field(default_factory=list)
    z: list[torch.Tensor] = field(default_factory=list)  # (n, ℓ) pieces, centroid only

    def add_skipped(self, item: Skipped, ell: int | None) -> None:
        self._add(item.key, item.index, item.label, None, None, None, None, None, item.reason,
                  None)  # fmt: skip
        if ell is not None:
            self.z.append(torch.zeros(1, ell))

    def add_batch(self, batch: Batch, scored: ScoredBatch, item: Featured | None = None) -> None:
        """The batch's rows; `item` (its features) gives the margin and signature columns."""
        self._add_selection_columns(scored, item)
        columns = [
            [None if v != v else v for v in t.tolist()]  # NaN -> null
            for t in (scored.score, scored.loss, scored.grad_norm, scored.energy, scored.coverage)
        ]
        labels = batch.y.tolist()
        for i, key in enumerate(batch.keys):
            score, loss, gnorm, energy, cover = (c[i] for c in columns)
            self._add(key, batch.indices[i], labels[i], score, loss, gnorm, energy, cover,
                      scored.reasons[i], batch.digests[i])  # fmt: skip
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
        coverage: float | None,
        reason: str | None,
        digest: int | None,
    ) -> None:
        values = (key, self.shard, label, score, loss, gnorm, energy, coverage)
        for column, value in zip(SCORE_COLUMNS[:8], values, strict=True):
            self.rows[column].append(value)
        self.rows["status"].append("ok" if reason is None else "error")
        self.rows["reason"].append(reason)
        self.rows["digest"].append(digest)
        self.index.append(index)
        if len(self.rows["margin"]) < len(self.index):  # a skipped sample: neither column
            self.rows["margin"].append(None)
            self.rows["signature"].append(None)

    def _add_selection_columns(self, scored: ScoredBatch, item: Featured | None) -> None:
        """margin and signature of a batch's scored rows (null where it has no score); they
        came to the host with the scores, as `scored.extra` (`selection_extra`)."""
        n = len(scored.reasons)
        ok = [r is None for r in scored.reasons]
        margins: list = [None] * n
        signatures: list = [None] * n
        extra, first = scored.extra, 0
        if item is not None and item.margin is not None and extra is not None:
            margins = [m if good and m == m and abs(m) != float("inf") else None
                       for m, good in zip(extra[:, 0].tolist(), ok, strict=True)]  # fmt: skip
            first = 1
        if item is not None and item.signature is not None and extra is not None:
            sig = extra[:, first:].float()
            finite = torch.isfinite(sig).all(dim=1).tolist()
            signatures = [row if good and fin else None
                          for row, good, fin in zip(sig.tolist(), ok, finite, strict=True)]  # fmt: skip
        self.rows["margin"].extend(margins)
        self.rows["signature"].extend(signatures)

    def order(self) -> list[int]:
        return sorted(range(len(self.index)), key=self.index.__getitem__)

    def table(self) -> pa.Table:
        order = self.order()
        return pa.table({c: [v[i] for i in order] for c, v in self.rows.items()})

    def projections(self) -> torch.Tensor:
        z = torch.cat(self.z) if self.z else torch.zeros(0, 0)
        return z[self.order()]


def selection_extra(item: Featured) -> torch.Tensor | None:
    """(B, k) on the device: the margin column, then the signature's, those the item has."""
    parts = [t if t.dim() == 2 else t[:, None] for t in (item.margin, item.signature)
             if t is not None]  # fmt: skip
    return torch.cat([p.double() for p in parts], dim=1) if parts else None


def _sketch_tensors(ctx: StageContext, sketch: StoredSketch | None) -> SketchTensors | None:
    if sketch is None:
        return None
    dev, stats = ctx.device, sketch.stats
    ridge = ridge_lambda(stats["frobenius_sq"], stats["n"], stats["delta"])
    return SketchTensors(
        sketch.sigma.to(dev), sketch.basis.to(dev), sketch.consensus.to(dev), ridge
    )


def score_items(
    ctx: StageContext, ref: ShardRef, items: Iterable[Item], sketch: StoredSketch | None
) -> tuple[ShardScores, str | None]:
    """Score one shard's items; returns its rows and the shard-level error, if it broke."""
    centroid = sketch is not None and ctx.cfg.consensus == "centroid"
    ell = sketch.sigma.shape[0] if sketch is not None and centroid else None
    tensors = _sketch_tensors(ctx, sketch)
    rows, error = ShardScores(ref.name), None
    for item in items:
        if isinstance(item, Featured):
            scored = score_batch(item.grads, item.loss, item.y, tensors, keep_z=centroid,
                                 extra=selection_extra(item))  # fmt: skip
            rows.add_batch(item.batch, scored, item)
        elif isinstance(item, Broken):
            error = item.reason
        elif isinstance(item, Skipped):  # pass 2 asks for every batch: no Bypassed here
            rows.add_skipped(item, ell)
    return rows, error


@dataclass
class ScoreResult:
    url: str
    seen: int
    scored: int
    errored: int
    shard_errors: list[dict[str, str]]
    seconds: float


def score_and_write(
    ctx: StageContext, ref: ShardRef, items: Iterable[Item], sketch: StoredSketch | None
) -> dict[str, Any]:
    """Score one shard and write its part (after its projections, for centroid consensus);
    returns the part's counts."""
    rows, error = score_items(ctx, ref, items, sketch)
    table = rows.table()
    if sketch is not None and ctx.cfg.consensus == "centroid":
        # unit rows: centroid scoring needs only directions, and raw z (σ grows like √N·‖g‖)
        # would overflow float16 at scale
        unit = torch.nn.functional.normalize(rows.projections(), dim=1)
        ctx.out.sketch_store().write_projections(ref.name, unit)
    write_part(ctx.out, ref.name, table, error)
    return part_counts(table, error)


def part_counts(table: pa.Table, error: str | None) -> dict[str, Any]:
    errored = errored_count(table)
    return {"seen": table.num_rows, "scored": table.num_rows - errored, "error": error}


def finished_parts(folder: OutputFolder, refs: list[ShardRef]) -> dict[str, dict[str, Any]]:
    """Counts of the shards whose part exists: those are done (parts are written atomically)."""
    found = {}
    for ref in refs:
        if folder.exists(folder.part(ref.name)):
            table, error = read_part(folder, ref.name, ["status"])
            found[ref.name] = part_counts(table, error)
    return found


# How an executor scores shards: each shard's part counts, yielded in the order of `refs`.
ScoreShards = Callable[
    [StageContext, list[ShardRef], StoredSketch | None, Progress], Iterable[dict[str, Any]]
]


def run_score_pass(
    ctx: StageContext, sketch: StoredSketch | None, score_shards: ScoreShards
) -> ScoreResult:
    """Pass 2 over every shard that has no scores part yet (`score_shards` says where).

    With centroid consensus, the scores are filled in afterwards from the stored z.
    """
    cfg, refs = ctx.cfg, ctx.refs
    centroid = sketch is not None and cfg.consensus == "centroid"
    if centroid:
        ctx.out.sketch_store().prepare_projections()
    progress = Progress("pass 2 (score)", len(refs), cfg.progress)
    counts = finished_parts(ctx.out, refs)
    for ref in refs:
        if ref.name in counts:
            progress.shard_done(ref.name)
    todo = [ref for ref in refs if ref.name not in counts]
    for ref, got in zip(todo, score_shards(ctx, todo, sketch, progress), strict=True):
        counts[ref.name] = got
        progress.shard_done(ref.name)
    seen = sum(counts[r.name]["seen"] for r in refs)
    scored = sum(counts[r.name]["scored"] for r in refs)
    shard_errors = [
        {"shard": r.name, "url": r.url, "reason": counts[r.name]["error"]}
        for r in refs
        if counts[r.name]["error"] is not None
    ]
    if centroid and sketch is not None:  # the consensus needs every z first; it reads the stored z
        classes, ell = sketch.consensus.shape
        scored = rescore_with_centroids(ctx.out, refs, classes, ell)
    seconds = progress.close()
    return ScoreResult(ctx.out.scores, seen, scored, seen - scored, shard_errors, seconds)
