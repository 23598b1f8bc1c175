"""Executors: where the per-shard work of the passes runs, kept apart from what it does.

    local   every shard in this process, in input order (the default; no extra dependency)
    ray     `executors.ray`: the same per-shard steps on a pool of Ray actors

Both are an `Executor`: the same three calls with the same arguments. The bookkeeping of each
pass (what is done already, the tallies, the manifest) is written once, in `passes/`; an
executor only says how a list of shards is mapped, and gets results back in shard order, so a
pass never asks which executor runs it.

Nothing here imports Ray: `open_executor` imports `executors.ray` only for `--executor ray`,
so the core installs and runs without the `ray` extra.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

from ..config import Config
from ..outputs.sketch_store import StoredSketch
from ..passes.emit import EmitJob, EmitResult, run_emit
from ..passes.loop import StageContext
from ..passes.score import ScoreResult, run_score_pass
from ..passes.sketch import SketchResult, stored_result
from ..progress import Progress
from ..sample import ShardRef

log = logging.getLogger("sage_stream")


class Executor(ABC):
    """Runs pass 1, pass 2 and emit; subclasses say where each shard's work happens."""

    def sketch(self, ctx: StageContext) -> SketchResult:
        """Pass 1 → OUT/sketch.zarr; a finished sketch with this identity is reused."""
        self.check(ctx.cfg, ctx.refs)
        done = stored_result(ctx)
        if done is not None:
            log.info("pass 1: %s is complete, nothing to do", done.url)
            return done
        return self.sketch_shards(ctx)

    def score(self, ctx: StageContext, sketch: StoredSketch | None) -> ScoreResult:
        """Pass 2 → OUT/scores/ for every shard without a part (`sketch` None: baselines)."""
        self.check(ctx.cfg, ctx.refs)
        return run_score_pass(ctx, sketch, self.score_shards)

    def emit(self, cfg: Config, refs: list[ShardRef], sketch_stats: dict | None) -> EmitResult:
        """Emit → OUT/shards/, then manifest, index and `_SUCCESS`."""
        self.check(cfg, refs)
        return run_emit(cfg, refs, sketch_stats, self.emit_jobs)

    def check(self, cfg: Config, refs: list[ShardRef]) -> None:  # noqa: B027 - optional hook
        """Refuse what this executor cannot run (a no-op here)."""

    @abstractmethod
    def sketch_shards(self, ctx: StageContext) -> SketchResult:
        """Pass 1 over ctx.refs, resuming from checkpoints, into the sketch store."""

    @abstractmethod
    def score_shards(
        self, ctx: StageContext, refs: list[ShardRef], sketch: StoredSketch | None,
        progress: Progress,
    ) -> Iterable[dict[str, Any]]:  # fmt: skip
        """Score and write each shard's part; yield its counts, in the order of `refs`."""

    @abstractmethod
    def emit_jobs(self, cfg: Config, jobs: list[EmitJob]) -> Iterable[dict[str, Any]]:
        """Emit each job's shard; yield its counts, in the order of `jobs`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the executor holds (Ray actors)."""


@contextlib.contextmanager
def open_executor(cfg: Config) -> Iterator[Executor]:
    """The executor `cfg.executor` names, for the length of a run (Ray actors live that long)."""
    if cfg.executor == "ray":
        from .ray import RayExecutor

        executor: Executor = RayExecutor(cfg, cfg.workers)
    else:
        from .local import LocalExecutor

        executor = LocalExecutor()
    try:
        yield executor
    finally:
        executor.close()


__all__ = ["Executor", "open_executor"]
