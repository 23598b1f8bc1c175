"""What runs inside a Ray worker: the per-shard steps of the passes, on one loaded model.

The Ray executor (`executors/ray.py`) turns `ShardWorker` into an actor, one per GPU (or CPU
slot), so that each worker loads the model once and then runs many shards. Every method calls
the very functions the local executor calls (`passes.sketch.sketch_unit`, `passes.score`,
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
from ..passes.loop import StageContext, build_context, pass2_items
from ..passes.score import score_and_write
from ..passes.sketch import SketchResult, Summary, finish_units, sketch_unit, stored_result
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

    def sketch_unit(self, refs: list[ShardRef], unit: int, units: int) -> Summary:
        """Pass 1 over one unit (see `passes.sketch.sketch_unit`): its summary, small (the
        states it hands over are files in OUT/_work/)."""
        return sketch_unit(self.ctx, refs, unit, units)

    def finish(self, summaries: list[Summary], seconds: float) -> SketchResult:
        """Replay the units' items in order and write sketch.zarr (`passes.sketch`), on a
        worker, where the merges run on the model's device."""
        return finish_units(self.ctx, summaries, seconds)

    def score(self, ref: ShardRef, sketch: StoredSketch | None) -> dict[str, Any]:
        """Pass 2 on one shard: writes scores/part-<shard>.parquet (and z for centroid)."""
        ctx = self.ctx
        if sketch is not None:
            ctx.out.sketch_store().check_identity(sketch.identity, ctx.identity())
        items = pass2_items(ctx, ref, Progress("pass 2 (score)", 1, False))
        return score_and_write(ctx, ref, items, sketch)

    def emit(self, job: EmitJob) -> dict[str, Any]:
        """Emit one shard on this worker (warm already: no model is needed for it)."""
        return emit_marked(self.ctx.cfg, job)
