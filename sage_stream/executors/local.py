"""`--executor local`: every shard in this process, one after the other, in input order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..config import Config
from ..outputs.sketch_store import StoredSketch
from ..passes.emit import EmitJob, emit_marked
from ..passes.loop import StageContext
from ..passes.score import score_and_write
from ..passes.sketch import SketchResult, sketch_here
from ..progress import Progress
from ..sample import ShardRef
from . import Executor


class LocalExecutor(Executor):
    def sketch_shards(self, ctx: StageContext) -> SketchResult:
        return sketch_here(ctx)

    def score_shards(
        self, ctx: StageContext, refs: list[ShardRef], sketch: StoredSketch | None,
        progress: Progress,
    ) -> Iterable[dict[str, Any]]:  # fmt: skip
        return (score_and_write(ctx, ref, sketch, progress) for ref in refs)

    def emit_jobs(self, cfg: Config, jobs: list[EmitJob]) -> Iterable[dict[str, Any]]:
        return (emit_marked(cfg, job) for job in jobs)
