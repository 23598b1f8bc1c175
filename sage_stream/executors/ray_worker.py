"""What runs inside a Ray worker: the per-shard steps of the passes, on one loaded model.

The Ray executor (`executors/ray.py`) turns `ShardWorker` into an actor, one per GPU (or CPU
slot), so that each worker loads the model once and then runs many shards. Everything here is
the code the local loop runs (`passes.sketching.sketch_shards`, `passes.scoring`, `emit`), with
the same checkpoints in OUT/_work/; only the order of shards and where partial results go
differ. Nothing here imports Ray at module level: it is testable without a cluster.

Pass 1 is split into contiguous blocks of shards, one per worker, each sketched in input order
into one state. Partials merge in block order: the result depends on the inputs and the number
of workers, never on which worker finished first; with one worker it is the local run's state,
bit for bit (and its checkpoint is the local `pass1.pt`, so either executor resumes the other).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..config import Config
from ..emit import emit_marked
from ..errors import MismatchError, SageError
from ..passes.context import StageContext, build_context
from ..passes.scoring import score_and_write
from ..passes.sketching import (
    SketchResult,
    SketchState,
    finish_sketch,
    sketch_shards,
    stored_result,
)
from ..progress import Progress
from ..resume import load_state, remove, save_state, work_url
from ..sample import ShardRef
from ..storage import join
from ..store import StoredSketch, check_identity
from ..tables import errored_count

Partial = dict[str, Any]  # SketchState.checkpoint() (CPU tensors, lists) + the worker's identity


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


def block_checkpoint(out: str, block: int, blocks: int) -> str:
    """Where block `block` of `blocks` keeps its pass 1 state; one block is the local run's."""
    if blocks == 1:
        return work_url(out, "pass1.pt")
    return work_url(out, f"pass1-block-{block:05d}-of-{blocks:05d}.pt")


def merge_partials(ctx: StageContext, partials: Iterable[Partial]) -> SketchState:
    """Stack-and-shrink the partial sketches in the order given; class sums and counts add.

    Takes an iterable so that a caller can fetch one partial at a time: memory stays at one
    partial plus the merged state, O(ℓ·D + C·D), whatever the number of workers.
    """
    state: SketchState | None = None
    for part in partials:
        other = SketchState.from_checkpoint(ctx, part)
        if state is None:
            state = other
            continue
        state.fd.merge(other.fd)
        state.class_sums += other.class_sums  # (C, D) float64, added in block order
        state.class_counts += other.class_counts
        state.shard_errors.extend(other.shard_errors)
        state.shards_done.extend(other.shards_done)
    if state is None:
        raise ValueError("merge_partials needs at least one partial")  # a bug, not bad input
    return state


class ShardWorker:
    """One worker: loads the model once, then sketches blocks and scores shards with it."""

    def __init__(self, cfg: Config):
        # Workers log one line per shard; the driver draws the bar for the whole pass.
        self._error: SageError | None = None
        try:
            self._ctx: StageContext | None = build_context(cfg.replace(progress=False), [])
        except SageError as exc:
            # An actor whose constructor raises dies with only the text of the error, and is
            # restarted for nothing: keep it alive and raise the typed error on every call.
            self._ctx, self._error = None, exc

    @property
    def ctx(self) -> StageContext:
        if self._ctx is None:
            raise self._error
        return self._ctx

    def stored_sketch(self) -> SketchResult | None:
        """The finished sketch of an earlier run with this identity (a rerun skips pass 1)."""
        return stored_result(self.ctx)

    def sketch_block(self, refs: list[ShardRef], block: int, blocks: int) -> Partial:
        """Pass 1 over `refs` in order, resuming from the block's checkpoint if there is one.

        The state is saved when the block is done, so a driver restarted later skips it; a
        retry after a crash starts from the last checkpoint, never from a half-updated state.
        """
        ctx, cfg = self.ctx, self.ctx.cfg
        url = block_checkpoint(cfg.out, block, blocks)
        saved = load_state(url, cfg.storage_options)
        state = SketchState.from_checkpoint(ctx, saved) if saved else SketchState.empty(ctx)
        if len(state.shards_done) < len(refs):
            sketch_shards(ctx, state, refs, url)
            save_state(url, state.checkpoint(), cfg.storage_options)
        return {**state.checkpoint(), "identity": ctx.identity()}

    def finish(self, partials: list[Any], seconds: float) -> SketchResult:
        """Merge the partials in block order, write sketch.zarr, drop the block checkpoints.

        `partials` are Ray object references (fetched here one at a time, on the worker that
        has the model's device, where the merge's SVDs are cheapest) or plain partials.
        """
        cfg = self.ctx.cfg
        parts = (self._checked(i, _fetch(p)) for i, p in enumerate(partials))
        result = finish_sketch(self.ctx, merge_partials(self.ctx, parts), seconds)
        for block in range(len(partials)):
            remove(block_checkpoint(cfg.out, block, len(partials)), cfg.storage_options)
        return result

    def _checked(self, block: int, part: Partial) -> Partial:
        """A partial from a worker that loaded other weights would merge silently: refuse it."""
        mine = self.ctx.identity()
        if part["identity"] != mine:
            raise MismatchError(
                f"the pass 1 partial of block {block} was made with another model or "
                f"configuration ({part['identity']} vs {mine}): do the checkpoint or the model "
                "code differ between the Ray nodes?"
            )
        return part

    def score(self, ref: ShardRef, sketch: StoredSketch | None) -> dict[str, Any]:
        """Pass 2 on one shard: writes scores/part-<shard>.parquet (and z for centroid)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        if sketch is not None:
            check_identity(join(cfg.out, "sketch.zarr"), sketch.identity, ctx.identity())
        progress = Progress("pass 2 (score)", 1, False)
        table, error = score_and_write(ctx, ref, sketch, progress)
        errored = errored_count(table)
        return {"seen": table.num_rows, "scored": table.num_rows - errored, "error": error}

    def emit(self, ref: ShardRef, kept: set[str], scorer: str, marker: str) -> dict[str, Any]:
        """Emit one shard on this worker (warm already: no model is needed for it)."""
        return emit_marked(self.ctx.cfg, ref, kept, scorer, marker)


def _fetch(part: Any) -> Partial:
    if isinstance(part, dict):
        return part
    import ray  # only reached inside a Ray worker, with object references

    return ray.get(part)
