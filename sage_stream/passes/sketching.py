"""Pass 1: shards → per-sample gradients → Frequent Directions sketch + class sums → sketch.zarr.

Memory is O(ℓ·D + C·D + batch): the FD buffer (2ℓ×D), the class sums (C×D, float64 so that
millions of small gradients add up exactly enough), and one batch. Samples that pass 2 will
record as errors (undecodable, non-finite) never enter the sketch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..batches import Skipped
from ..errors import SampleError, ShardError
from ..progress import Progress
from ..sample import ShardRef
from ..scores import consensus_directions
from ..sketch import FrequentDirections
from ..store import write_sketch
from ..urls import join
from .context import StageContext

log = logging.getLogger("sage_stream")


@dataclass
class SketchState:
    """Everything pass 1 accumulates; small enough to checkpoint: O(ℓ·D + C·D)."""

    fd: FrequentDirections
    class_sums: Tensor  # (C, D) float64
    class_counts: Tensor  # (C,) int64
    shard_errors: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def empty(cls, ctx: StageContext) -> SketchState:
        dim, classes = ctx.featurizer.dim, ctx.num_classes
        return cls(
            FrequentDirections(ctx.cfg.ell, dim, device=ctx.device),
            torch.zeros(classes, dim, dtype=torch.float64, device=ctx.device),
            torch.zeros(classes, dtype=torch.int64, device=ctx.device),
        )


@dataclass
class SketchResult:
    url: str
    samples: int  # rows that entered the sketch
    classes: int
    dim: int
    ell: int
    stats: dict[str, Any]
    shard_errors: list[dict[str, str]]
    seconds: float


def sketch_shard(ctx: StageContext, ref: ShardRef, state: SketchState, progress: Progress) -> None:
    """Add one shard's usable gradients to the sketch and the class sums."""
    fail = ctx.cfg.on_error == "fail"
    for item in ctx.batches(ref):
        if isinstance(item, Skipped):  # recorded in scores/ by pass 2
            progress.advance(1)
            continue
        feats = ctx.features(item)
        usable = torch.isfinite(feats.loss) & torch.isfinite(feats.grads).all(dim=1)
        if fail and not bool(usable.all()):
            bad = int((~usable).nonzero()[0, 0])
            raise SampleError(ref.name, item.keys[bad], "non-finite loss or gradient")
        grads, labels = feats.grads[usable], item.y.to(ctx.device)[usable]
        state.fd.update(grads)
        state.class_sums.index_add_(0, labels, grads.to(torch.float64))
        state.class_counts += torch.bincount(labels, minlength=ctx.num_classes)
        progress.advance(len(item.keys))


def sketch_shards(ctx: StageContext, state: SketchState, refs: list[ShardRef]) -> float:
    """Run pass 1 over `refs` into `state`; returns the wall time."""
    progress = Progress("pass 1 (sketch)", len(refs), ctx.cfg.progress)
    for ref in refs:
        try:
            sketch_shard(ctx, ref, state, progress)
        except ShardError as exc:
            if ctx.cfg.on_error == "fail":
                raise
            log.warning("pass 1: skipping the rest of %s: %s", ref.name, exc.reason)
            state.shard_errors.append({"shard": ref.name, "url": ref.url, "reason": exc.reason})
        progress.shard_done(ref.name)
    return progress.close()


def finish_sketch(ctx: StageContext, state: SketchState, seconds: float) -> SketchResult:
    """Finalize the FD sketch, derive the class consensus directions and store both."""
    fd = state.fd
    sigma, basis = fd.finalize()
    consensus = consensus_directions(sigma, basis, state.class_sums)
    stats = {
        "n": fd.n_rows,
        "frobenius_sq": fd.frobenius_sq,
        "delta": fd.delta,
        "relative_error_bound": fd.delta / fd.frobenius_sq if fd.frobenius_sq else 0.0,
        "captured": float((sigma.double() ** 2).sum()) / fd.frobenius_sq
        if fd.frobenius_sq
        else 0.0,
    }
    url = join(ctx.cfg.out, "sketch.zarr")
    write_sketch(
        url,
        sigma=sigma,
        basis=basis,
        consensus=consensus,
        class_counts=state.class_counts,
        identity=ctx.identity(),
        stats=stats,
        storage_options=ctx.cfg.storage_options,
    )
    return SketchResult(
        url, fd.n_rows, ctx.num_classes, fd.dim, fd.ell, stats, state.shard_errors, seconds
    )


def run_sketch_pass(ctx: StageContext) -> SketchResult:
    state = SketchState.empty(ctx)
    seconds = sketch_shards(ctx, state, ctx.refs)
    return finish_sketch(ctx, state, seconds)
