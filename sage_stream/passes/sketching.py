"""Pass 1: shards → per-sample gradients → Frequent Directions sketch + class sums → sketch.zarr.

Memory is O(ℓ·D + C·D + batch): the FD buffer (2ℓ×D), the class sums (C×D, float64 so that
millions of small gradients add up exactly enough), and one batch. Samples that pass 2 will
record as errors (undecodable, non-finite) never enter the sketch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..batches import Skipped
from ..errors import InputError, SampleError, ShardError
from ..progress import Progress
from ..resume import load_state, remove, save_state, work_url
from ..sample import ShardRef
from ..scores import consensus_directions
from ..sketch import FrequentDirections
from ..storage import join
from ..store import read_sketch, write_sketch
from .context import StageContext

log = logging.getLogger("sage_stream")


@dataclass
class SketchState:
    """Everything pass 1 accumulates; small enough to checkpoint: O(ℓ·D + C·D)."""

    fd: FrequentDirections
    class_sums: Tensor  # (C, D) float64
    class_counts: Tensor  # (C,) int64
    shard_errors: list[dict[str, str]] = field(default_factory=list)

    shards_done: list[str] = field(default_factory=list)

    def checkpoint(self) -> dict[str, Any]:
        return {
            "fd": self.fd.state_dict(),
            "class_sums": self.class_sums.cpu(),
            "class_counts": self.class_counts.cpu(),
            "shard_errors": self.shard_errors,
            "shards_done": self.shards_done,
        }

    @classmethod
    def from_checkpoint(cls, ctx: StageContext, ckpt: dict[str, Any]) -> SketchState:
        fd = FrequentDirections.from_state_dict(ckpt["fd"], device=ctx.device)
        sums, counts = ckpt["class_sums"].to(ctx.device), ckpt["class_counts"].to(ctx.device)
        return cls(fd, sums, counts, list(ckpt["shard_errors"]), list(ckpt["shards_done"]))

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
        try:
            feats = ctx.features(ref, item)
        except SampleError:
            if fail:
                raise
            progress.advance(len(item.keys))  # recorded, sample by sample, by pass 2
            continue
        usable = torch.isfinite(feats.loss) & torch.isfinite(feats.grads).all(dim=1)
        if fail and not bool(usable.all()):
            bad = int((~usable).nonzero()[0, 0])
            raise SampleError(ref.name, item.keys[bad], "non-finite loss or gradient", ref.url)
        grads, labels = feats.grads[usable], item.y.to(ctx.device)[usable]
        state.fd.update(grads)
        state.class_sums.index_add_(0, labels, grads.to(torch.float64))
        state.class_counts += torch.bincount(labels, minlength=ctx.num_classes)
        progress.advance(len(item.keys))


def sketch_shards(
    ctx: StageContext, state: SketchState, refs: list[ShardRef], checkpoint_url: str | None = None
) -> float:
    """Run pass 1 over the `refs` not yet in `state`; returns the wall time.

    With `checkpoint_url`, the state is saved after a shard once `checkpoint_every` seconds
    have passed since the last save, so a killed run redoes at most the shards since then.
    """
    cfg = ctx.cfg
    todo = [ref for ref in refs if ref.name not in set(state.shards_done)]
    progress = Progress("pass 1 (sketch)", len(refs), cfg.progress)
    progress.shards = len(refs) - len(todo)
    last_save = time.monotonic()
    for ref in todo:
        try:
            sketch_shard(ctx, ref, state, progress)
        except ShardError as exc:
            if cfg.on_error == "fail":
                raise
            log.warning("pass 1: skipping the rest of %s: %s", ref.name, exc.reason)
            state.shard_errors.append({"shard": ref.name, "url": ref.url, "reason": exc.reason})
        state.shards_done.append(ref.name)
        progress.shard_done(ref.name)
        if checkpoint_url and time.monotonic() - last_save >= cfg.checkpoint_every:
            save_state(checkpoint_url, state.checkpoint(), cfg.storage_options)
            last_save = time.monotonic()
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
        "shard_errors": state.shard_errors,
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


def stored_result(ctx: StageContext) -> SketchResult | None:
    """The finished sketch of an earlier run with this identity, if there is one."""
    url = join(ctx.cfg.out, "sketch.zarr")
    try:
        stored = read_sketch(url, expected=ctx.identity(), storage_options=ctx.cfg.storage_options)
    except InputError:  # absent or incomplete: sketch it (a mismatch still raises)
        return None
    ell, dim = stored.basis.shape
    n, classes = stored.stats["n"], stored.class_counts.shape[0]
    return SketchResult(url, n, classes, dim, ell, stored.stats, stored.stats["shard_errors"], 0.0)


def run_sketch_pass(ctx: StageContext) -> SketchResult:
    """Pass 1, resuming from the checkpoint in OUT/_work/ if a killed run left one."""
    cfg = ctx.cfg
    done = stored_result(ctx)
    if done is not None:
        log.info("pass 1: %s is complete, nothing to do", done.url)
        return done
    checkpoint_url = work_url(cfg.out, "pass1.pt")
    ckpt = load_state(checkpoint_url, cfg.storage_options)
    state = SketchState.from_checkpoint(ctx, ckpt) if ckpt else SketchState.empty(ctx)
    if ckpt:
        log.info("pass 1: resuming after %d shards", len(state.shards_done))
    seconds = sketch_shards(ctx, state, ctx.refs, checkpoint_url)
    result = finish_sketch(ctx, state, seconds)
    remove(checkpoint_url, cfg.storage_options)
    return result
