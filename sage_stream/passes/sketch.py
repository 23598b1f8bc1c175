"""Pass 1: shards → per-sample gradients → Frequent Directions sketch + class sums → sketch.zarr.

Memory is O(ℓ·D + C·D + batch): the FD buffer (2ℓ×D), the class sums (C×D, float64 so that
millions of small gradients add up exactly enough), and one batch. Samples that pass 2 will
record as errors (undecodable, non-finite) never enter the sketch.

The pass runs over fixed *groups* of consecutive shards (`plan_groups`: at most 1024, planned
from the shard list alone), each sketched from an empty state with its own checkpoint, and
the groups' states are merged in a fixed binary tree over group positions (`merge_in_tree`).
The local executor sketches the groups in order in this process; the Ray executor hands them to
whichever worker is free. Either way the same states meet in the same merges, so the sketch,
the scores and the kept set are the same bytes for any executor and any number of workers.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
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
Partial = dict[str, Any]  # SketchState.checkpoint() (CPU tensors, lists) + the group's identity


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
    ctx: StageContext,
    state: SketchState,
    refs: list[ShardRef],
    checkpoint_url: str | None = None,
    progress: Progress | None = None,
) -> float:
    """Run pass 1 over the `refs` not yet in `state`; returns the wall time.

    With `checkpoint_url`, the state is saved after a shard once `checkpoint_every` seconds
    have passed since the last save, so a killed run redoes at most the shards since then.
    """
    todo = [ref for ref in refs if ref.name not in set(state.shards_done)]
    own = progress is None
    if progress is None:
        progress = Progress("pass 1 (sketch)", len(refs), ctx.cfg.progress)
        progress.shards = len(refs) - len(todo)
    sketch_stream(ctx, state, shard_stream(ctx, todo, progress), checkpoint_url, progress)
    return progress.close() if own else 0.0


def sketch_stream(
    ctx: StageContext,
    state: SketchState,
    shards: Iterable[tuple[ShardRef, Iterable[Item]]],
    checkpoint_url: str | None,
    progress: Progress,
) -> None:
    """Add every (shard, items) of `shards` to `state`, saving it as `sketch_shards` says."""
    last_save = time.monotonic()
    for ref, items in shards:
        sketch_items(ctx, ref, items, state)
        state.shards_done.append(ref.name)
        progress.shard_done(ref.name)
        if checkpoint_url and time.monotonic() - last_save >= ctx.cfg.checkpoint_every:
            ctx.out.save_state(checkpoint_url, state.checkpoint())
            last_save = time.monotonic()


# --- groups and the merge tree ------------------------------------------------------------------

MAX_GROUPS = 1024  # partials of O(ℓ·D + C·D) each: their number is bounded, not N's


def plan_groups(refs: list[ShardRef], max_groups: int = MAX_GROUPS) -> list[list[ShardRef]]:
    """Fixed groups of consecutive shards in input order, as even as possible, none empty.

    min(S, max_groups) groups; 10 shards with max_groups 4 -> sizes 3, 3, 2, 2. The plan
    depends only on the shard list, never on the number of workers or on scheduling: each
    group is sketched from an empty state, and the groups' partials are merged in a fixed
    tree (`merge_in_tree`), so the sketch is the same on one machine and on many.
    """
    count = max(1, min(max_groups, len(refs)))
    size, extra = divmod(len(refs), count)
    groups, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        groups.append(refs[start:stop])
        start = stop
    return groups


def tree_split(lo: int, hi: int) -> int:
    """Where the merge tree splits the group positions [lo, hi): a balanced binary tree."""
    return (lo + hi) // 2


def merge_in_tree(lo: int, hi: int, leaf: Callable[[int], SketchState]) -> SketchState:
    """The states of groups lo..hi-1 merged in the fixed tree: left subtree, right subtree,
    then stack-and-shrink of the two. Leaves are asked for in order, once each; memory is one
    state per tree level, O((ℓ·D + C·D) · log₂ G)."""
    if hi - lo == 1:
        return leaf(lo)
    mid = tree_split(lo, hi)
    left = merge_in_tree(lo, mid, leaf)
    left.merge(merge_in_tree(mid, hi, leaf))
    return left


def group_checkpoint(ctx: StageContext, group: int, groups: int) -> str:
    """Where group `group` of `groups` keeps its pass 1 state (the same for every executor)."""
    return ctx.out.work(f"pass1-group-{group:05d}-of-{groups:05d}.pt")


def resume_group(ctx: StageContext, group: int, groups: int) -> SketchState:
    """The group's state from its checkpoint, if a killed run left one, else an empty one."""
    saved = ctx.out.load_state(group_checkpoint(ctx, group, groups))
    if saved is None:
        return SketchState.empty(ctx)
    return SketchState.from_checkpoint(ctx, saved)


def sketch_group(
    ctx: StageContext,
    refs: list[ShardRef],
    group: int,
    groups: int,
    progress: Progress | None = None,
) -> SketchState:
    """Pass 1 over one group from an empty state, resuming from its checkpoint; saved when
    done, so that a rerun (on any executor, with any number of workers) skips it."""
    url = group_checkpoint(ctx, group, groups)
    state = resume_group(ctx, group, groups)
    if len(state.shards_done) < len(refs):
        if state.shards_done:
            log.info("pass 1: group %d resumes after %d shards", group, len(state.shards_done))
        sketch_shards(ctx, state, refs, url, progress)
        ctx.out.save_state(url, state.checkpoint())
    elif progress is not None:
        for ref in refs:
            progress.shard_done(ref.name)
    return state


def partial_of(ctx: StageContext, state: SketchState) -> Partial:
    return {**state.checkpoint(), "identity": ctx.identity()}


def state_of(ctx: StageContext, part: Partial, group: int) -> SketchState:
    """A group's partial as a state, refusing one made with another model or configuration."""
    mine = ctx.identity()
    if part["identity"] != mine:  # a worker that loaded other weights would merge silently
        raise MismatchError(
            f"the pass 1 partial of group {group} was made with another model or "
            f"configuration ({part['identity']} vs {mine}): do the checkpoint or the model "
            "code differ between the Ray nodes?"
        )
    return SketchState.from_checkpoint(ctx, part)


def finish_groups(
    ctx: StageContext, leaf: Callable[[int], SketchState], groups: int, seconds: float
) -> SketchResult:
    """Merge the groups' states in the tree, store the sketch, drop the group checkpoints."""
    result = finish_sketch(ctx, merge_in_tree(0, groups, leaf), seconds)
    for group in range(groups):
        ctx.out.remove(group_checkpoint(ctx, group, groups))
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
    """Pass 1 in this process (the local executor): the groups in order, each merged into the
    tree as soon as it is sketched, the same groups and tree as on Ray.

    The groups without a checkpoint are read as one stream (one set of loader processes for
    the pass); a group a killed run left part-done resumes from its checkpoint.
    """
    groups = plan_groups(ctx.refs)
    n = len(groups)
    progress = Progress("pass 1 (sketch)", len(ctx.refs), ctx.cfg.progress)
    fresh = {i for i in range(n) if not ctx.out.exists(group_checkpoint(ctx, i, n))}
    stream = shard_stream(ctx, [r for i in sorted(fresh) for r in groups[i]], progress)

    def leaf(i: int) -> SketchState:
        if i not in fresh:
            return sketch_group(ctx, groups[i], i, n, progress)
        url, state = group_checkpoint(ctx, i, n), SketchState.empty(ctx)
        sketch_stream(ctx, state, itertools.islice(stream, len(groups[i])), url, progress)
        ctx.out.save_state(url, state.checkpoint())
        return state

    try:
        merged = merge_in_tree(0, n, leaf)
    finally:
        getattr(stream, "close", lambda: None)()  # the loader's processes, if any
    result = finish_sketch(ctx, merged, progress.close())
    for group in range(n):
        ctx.out.remove(group_checkpoint(ctx, group, n))
    return result
