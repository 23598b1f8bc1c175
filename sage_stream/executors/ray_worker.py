"""What runs inside a Ray worker: the per-shard steps of the passes, on one loaded model.

The Ray executor (`executors/ray.py`) turns `ShardWorker` into an actor, one per GPU (or CPU
slot), so that each worker loads the model once and then runs many shards. Every method calls
the very functions the local executor calls (`passes.sketch.sketch_group`, `passes.score`,
`passes.emit`), with the same checkpoints in OUT/_work/; only the order of shards and where
partial results go differ. Nothing here imports Ray at module level: it is testable without a
cluster.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import SageError
from ..outputs.sketch_store import StoredSketch
from ..passes.emit import EmitJob, emit_marked
from ..passes.loop import StageContext, build_context, shard_items
from ..passes.score import score_and_write
from ..passes.sketch import (
    Partial,
    SketchResult,
    finish_groups,
    partial_of,
    sketch_group,
    state_of,
    stored_result,
)
from ..progress import Progress
from ..sample import ShardRef


class ShardWorker:
    """One worker: loads the model once, then sketches groups and scores shards with it."""

    def __init__(self, cfg: Config):
        # Workers log one line per shard; the driver draws the bar for the whole pass.
        self._setup: StageContext | SageError
        try:
            self._setup = build_context(cfg.replace(progress=False), [])
        except SageError as exc:
            # An actor whose constructor raises dies with only the text of the error, and is
            # restarted for nothing: keep it alive and raise the typed error on every call.
            self._setup = exc

    @property
    def ctx(self) -> StageContext:
        if isinstance(self._setup, SageError):
            raise self._setup
        return self._setup

    def stored_sketch(self) -> SketchResult | None:
        """The finished sketch of an earlier run with this identity (also: a warm-up call)."""
        return stored_result(self.ctx)

    def sketch_group(self, refs: list[ShardRef], group: int, groups: int) -> tuple[int, Partial]:
        """Pass 1 over one group (see `passes.sketch.sketch_group`): (its shard count, its
        partial). The Ray executor asks for two returns, so that the driver waits on the
        small count and the partial goes to the merge without visiting the driver."""
        state = sketch_group(self.ctx, refs, group, groups)
        return len(refs), partial_of(self.ctx, state)

    def finish(self, partials: list[Any], seconds: float) -> SketchResult:
        """Merge the groups' partials in the fixed tree and write sketch.zarr (`passes.sketch`).

        `partials` are Ray object references, fetched here one at a time as the tree needs
        them (one state per tree level in memory), on a worker, where the merge's SVDs run
        on the model's device; or plain partials.
        """
        ctx = self.ctx
        leaf = lambda i: state_of(ctx, _fetch(partials[i]), i)  # noqa: E731
        return finish_groups(ctx, leaf, len(partials), seconds)

    def score(self, ref: ShardRef, sketch: StoredSketch | None) -> dict[str, Any]:
        """Pass 2 on one shard: writes scores/part-<shard>.parquet (and z for centroid)."""
        ctx = self.ctx
        if sketch is not None:
            ctx.out.sketch_store().check_identity(sketch.identity, ctx.identity())
        items = shard_items(ctx, ref, Progress("pass 2 (score)", 1, False))
        return score_and_write(ctx, ref, items, sketch)

    def emit(self, job: EmitJob) -> dict[str, Any]:
        """Emit one shard on this worker (warm already: no model is needed for it)."""
        return emit_marked(self.ctx.cfg, job)


def _fetch(part: Any) -> Partial:
    if isinstance(part, dict):
        return part
    import ray  # only reached inside a Ray worker, with object references

    return ray.get(part)
