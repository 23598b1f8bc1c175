"""Pass 1: shards → per-sample gradients → Frequent Directions sketch + class sums → sketch.zarr.

Memory is O(ℓ·D + C·D + batch): the FD buffer (2ℓ×D), the class sums (C×D, float64 so that
millions of small gradients add up exactly enough), and one batch. Samples that pass 2 will
record as errors (undecodable, non-finite) never enter the sketch.

The pass runs over *blocks* of consecutive shards (`plan_blocks`), each sketched in input
order into one state with its own checkpoint, and the block states are merged in block order
(`finish_blocks`). The local executor runs one block over every shard; the Ray executor one
block per worker. With one block the result is the local run's, bit for bit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, MismatchError
from ..fd import FrequentDirections
from ..progress import Progress
from ..sample import ShardRef
from ..scores import consensus_directions
from .loop import Broken, Featured, Item, StageContext, shard_stream

log = logging.getLogger("sage_stream")
Partial = dict[str, Any]  # SketchState.checkpoint() (CPU tensors, lists) + the block's identity


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

    def add(self, item: Featured, num_classes: int) -> None:
        usable = item.usable
        grads, labels = item.grads[usable], item.y[usable]
        self.fd.update(grads)
        self.class_sums.index_add_(0, labels, grads.to(torch.float64))
        self.class_counts += torch.bincount(labels, minlength=num_classes)

    def merge(self, other: SketchState) -> None:
        """Stack-and-shrink; class sums and counts add (in the order merges are made)."""
        self.fd.merge(other.fd)
        self.class_sums += other.class_sums  # (C, D) float64
        self.class_counts += other.class_counts
        self.shard_errors.extend(other.shard_errors)
        self.shards_done.extend(other.shards_done)


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


def sketch_items(
    ctx: StageContext, ref: ShardRef, items: Iterable[Item], state: SketchState
) -> None:
    """Add one shard's usable gradients to the sketch and the class sums."""
    for item in items:
        if isinstance(item, Featured):
            state.add(item, ctx.num_classes)
        elif isinstance(item, Broken):
            state.shard_errors.append({"shard": ref.name, "url": ref.url, "reason": item.reason})
        # a Skipped sample is recorded in scores/ by pass 2


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
    for ref, items in shard_stream(ctx, todo, progress):
        sketch_items(ctx, ref, items, state)
        state.shards_done.append(ref.name)
        progress.shard_done(ref.name)
        if checkpoint_url and time.monotonic() - last_save >= cfg.checkpoint_every:
            ctx.out.save_state(checkpoint_url, state.checkpoint())
            last_save = time.monotonic()
    return progress.close()


def plan_blocks(refs: list[ShardRef], workers: int) -> list[list[ShardRef]]:
    """Contiguous blocks of shards in input order, as even as possible, none empty.

    10 shards on 4 workers -> sizes 3, 3, 2, 2. The plan depends only on the shard list and the
    number of workers, which is what makes the merged sketch independent of scheduling.
    """
    count = max(1, min(workers, len(refs)))
    size, extra = divmod(len(refs), count)
    blocks, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        blocks.append(refs[start:stop])
        start = stop
    return blocks


def block_checkpoint(ctx: StageContext, block: int, blocks: int) -> str:
    """Where block `block` of `blocks` keeps its pass 1 state; one block is the local run's."""
    if blocks == 1:
        return ctx.out.work("pass1.pt")
    return ctx.out.work(f"pass1-block-{block:05d}-of-{blocks:05d}.pt")


def resume_block(ctx: StageContext, block: int, blocks: int) -> SketchState:
    """The block's state from its checkpoint, if a killed run left one, else an empty one."""
    saved = ctx.out.load_state(block_checkpoint(ctx, block, blocks))
    if saved is None:
        return SketchState.empty(ctx)
    log.info("pass 1: block %d resumes after %d shards", block, len(saved["shards_done"]))
    return SketchState.from_checkpoint(ctx, saved)


def sketch_block(ctx: StageContext, refs: list[ShardRef], block: int, blocks: int) -> Partial:
    """Pass 1 over one block, resuming from its checkpoint; saved when done, so that a driver
    restarted later skips it. Returns the block's partial (its state and identity)."""
    url = block_checkpoint(ctx, block, blocks)
    state = resume_block(ctx, block, blocks)
    if len(state.shards_done) < len(refs):
        sketch_shards(ctx, state, refs, url)
        ctx.out.save_state(url, state.checkpoint())
    return {**state.checkpoint(), "identity": ctx.identity()}


def merge_partials(ctx: StageContext, partials: Iterable[Partial]) -> SketchState:
    """Stack-and-shrink the partial sketches in the order given, refusing foreign ones.

    Takes an iterable so that a caller can fetch one partial at a time: memory stays at one
    partial plus the merged state, O(ℓ·D + C·D), whatever the number of blocks.
    """
    mine = ctx.identity()
    state: SketchState | None = None
    for block, part in enumerate(partials):
        if part["identity"] != mine:  # a worker that loaded other weights would merge silently
            raise MismatchError(
                f"the pass 1 partial of block {block} was made with another model or "
                f"configuration ({part['identity']} vs {mine}): do the checkpoint or the model "
                "code differ between the Ray nodes?"
            )
        other = SketchState.from_checkpoint(ctx, part)
        if state is None:
            state = other
        else:
            state.merge(other)
    if state is None:
        raise ValueError("merge_partials needs at least one partial")  # a bug, not bad input
    return state


def finish_blocks(ctx: StageContext, partials: Iterable[Partial], blocks: int,
                  seconds: float) -> SketchResult:  # fmt: skip
    """Merge the block partials in block order, store the sketch, drop the block checkpoints."""
    result = finish_sketch(ctx, merge_partials(ctx, partials), seconds)
    for block in range(blocks):
        ctx.out.remove(block_checkpoint(ctx, block, blocks))
    return result


def finish_sketch(ctx: StageContext, state: SketchState, seconds: float) -> SketchResult:
    """Finalize the FD sketch, derive the class consensus directions and store both."""
    fd = state.fd
    sigma, basis = fd.finalize()
    consensus = consensus_directions(sigma, basis, state.class_sums)
    frob = fd.frobenius_sq
    stats = {
        "n": fd.n_rows,
        "frobenius_sq": frob,
        "delta": fd.delta,
        "relative_error_bound": fd.delta / frob if frob else 0.0,
        "captured": float((sigma.double() ** 2).sum()) / frob if frob else 0.0,
        "shard_errors": state.shard_errors,
    }
    ctx.out.sketch_store().write(
        sigma=sigma,
        basis=basis,
        consensus=consensus,
        class_counts=state.class_counts,
        identity=ctx.identity(),
        stats=stats,
    )
    return SketchResult(
        ctx.out.sketch, fd.n_rows, ctx.num_classes, fd.dim, fd.ell, stats, state.shard_errors,
        seconds,
    )  # fmt: skip


def stored_result(ctx: StageContext) -> SketchResult | None:
    """The finished sketch of an earlier run with this identity, if there is one."""
    try:
        head = ctx.out.sketch_store().header(expected=ctx.identity())
    except InputError:  # absent or incomplete: sketch it (a mismatch still raises)
        return None
    stats = head["stats"]
    return SketchResult(ctx.out.sketch, stats["n"], head["classes"], head["dim"], head["ell"],
                        stats, stats["shard_errors"], 0.0)  # fmt: skip


def sketch_here(ctx: StageContext) -> SketchResult:
    """Pass 1 as one block over every shard in this process (the local executor)."""
    url = block_checkpoint(ctx, 0, 1)
    state = resume_block(ctx, 0, 1)
    seconds = sketch_shards(ctx, state, ctx.refs, url)
    result = finish_sketch(ctx, state, seconds)
    ctx.out.remove(url)
    return result
