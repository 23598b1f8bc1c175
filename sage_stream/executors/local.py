"""`--executor local`: every shard in this process, in input order.

Pass 1 and pass 2 read and decode their shards through the loader (`--loader-workers`
processes, passes/loader.py), in shard order. Emit, which only copies bytes, copies shards
side by side in that many processes when there are two or more; results come back in shard
order either way, so the outputs are the same for any number of workers.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..config import Config
from ..outputs.sketch_store import StoredSketch
from ..passes.emit import EmitJob, emit_marked
from ..passes.loader import loader_workers_for
from ..passes.loop import StageContext, score_stream
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
    ) -> Iterator[dict[str, Any]]:  # fmt: skip
        for ref, items in score_stream(ctx, refs, progress):
            yield score_and_write(ctx, ref, items, sketch)

    def emit_jobs(self, cfg: Config, jobs: list[EmitJob]) -> Iterable[dict[str, Any]]:
        urls = [cfg.out, *(job.ref.url for job in jobs)]
        workers = min(loader_workers_for(cfg.loader_workers, torch.device("cpu"), urls), len(jobs))
        if workers < 2:  # one process beside this one would only wait for it
            return (emit_marked(cfg, job) for job in jobs)
        return _emit_in_processes(cfg.replace(model=None, preprocess=None), jobs, workers)


def _emit_in_processes(cfg: Config, jobs: list[EmitJob], workers: int) -> Iterator[dict]:
    """Emit jobs in `workers` spawned processes (no model in `cfg`); results in job order."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(emit_marked, cfg, job) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
