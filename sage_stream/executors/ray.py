"""`--executor ray`: the same passes, shard-parallel on a Ray cluster: workers
sketch disjoint shards, sketches merge by stack-and-shrink, pass 2 and emit are shard-parallel
(docs/ray.md).

Where it sits: an `Executor` (executors/__init__.py) like the local one. The passes' bookkeeping
(what is done already, the tallies, the manifest) is theirs, in `passes/`; this module only maps
shards onto actors (`ray_worker.ShardWorker`, which runs the very per-shard functions the local
executor calls) and hands the results back in shard order. The driver only plans, dispatches
and collects small results; the data never flows through it.

    workers  `RayWorkers`: one actor per GPU (or CPU slot), each loading the model once, shared
             by the passes of a run
    pass 1   one unit of consecutive shards per worker (`plan_units`); each worker sketches
             the groups that start in its unit (reading on to the end of the last one) and
             stores what it cannot fold as items in OUT/_work/; worker 0 replays the items in
             unit order and writes sketch.zarr
    pass 2   shards handed to the next idle worker; each writes scores/part-<shard>.parquet;
             centroid consensus is then scored on the driver
    emit     shards handed to the workers (or one Ray task per shard, when emit runs alone);
             then manifest, index and _SUCCESS on the driver

Why this gives the local bytes: pass 1's groups and merge tree are placed by the samples'
content (passes/groups.py), not by shards or workers, so the local executor sketches the very
same groups and merges them in the very same tree, whatever the units and the scheduling. A
unit hands over O(log N) states of O(ℓ·D + C·D), each written once to OUT/_work/ and read once
by worker 0.

Faults: actors restart after a crash (`MAX_RESTARTS`) and the call in flight is retried
(`MAX_TASK_RETRIES`): a retried unit resumes from its last checkpoint in OUT/_work/, a retried
shard rewrites its part whole, so no sample is counted twice. A restarted driver resumes from
the same checkpoints. Errors of the stage itself (bad input under --on-error fail, a sketch
from another model) are not retried: they come back as the typed error the local run raises.

Only this module imports Ray, and only `open_executor` imports this module, when asked to.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from ..config import Config
from ..errors import InputError, SageError
from ..outputs.sketch_store import StoredSketch
from ..passes.emit import EmitJob, emit_marked
from ..passes.loop import StageContext
from ..passes.sketch import SketchResult, plan_units
from ..progress import Progress
from ..sample import ShardRef
from . import Executor
from .ray_worker import ShardWorker

try:
    import ray
    from ray.util import ActorPool
except ImportError:  # pragma: no cover - depends on the environment
    raise InputError("--executor ray needs Ray: pip install 'sage-stream[ray]'") from None

log = logging.getLogger("sage_stream")
MAX_RESTARTS = 3  # per actor: a node lost or a worker OOM-killed more often than this is fatal
MAX_TASK_RETRIES = 3  # per call in flight when its actor (or task worker) died


def connect() -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS, or start a local one.

    `ray.init` installs its own SIGTERM handler in the driver, which aborts the process without
    unwinding: the CLI's (an orchestrator's stop leaves OUT resumable and unlocked, exit 143)
    or a caller's own handler would never run. The handler the process had is put back.
    """
    if not ray.is_initialized():
        main = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGTERM) if main else None
        ray.init()
        if callable(before):  # a Python handler (not SIG_DFL or SIG_IGN): the caller's
            signal.signal(signal.SIGTERM, before)


def gpus_per_worker(cfg: Config) -> int:
    """1 when the model should run on CUDA on the cluster, else 0 (CPU workers)."""
    if cfg.device.startswith("cuda"):
        return 1
    if cfg.device == "auto":
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return 0


def ray_workers(cfg: Config, workers: int | None) -> int:
    """Workers asked for, or one per GPU of the cluster (2 on CPU); refused if they cannot fit."""
    gpus = gpus_per_worker(cfg)
    total = ray.cluster_resources()
    if workers is None:
        workers = max(1, int(total.get("GPU", 0))) if gpus else 2
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"--workers must be a positive integer, got {workers!r}")
    kind, have = ("GPU", total.get("GPU", 0)) if gpus else ("CPU", total.get("CPU", 0))
    if workers > have:
        # Actors that cannot be placed wait forever and hold the pass: refuse instead.
        raise InputError(
            f"{workers} Ray workers need {workers} {kind}s, the cluster has {have:g}: "
            "pass --workers N (N at most that), or grow the cluster first"
        )
    return workers


@contextlib.contextmanager
def stage_errors() -> Iterator[None]:
    """Re-raise a worker's SageError as itself, as the local executor would raise it."""
    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, SageError):
            raise exc.cause from None
        raise


class RayWorkers:
    """The worker actors of a run: one model load each, shared by the passes, then stopped."""

    def __init__(self, cfg: Config, workers: int | None = None):
        connect()
        gpus = gpus_per_worker(cfg)
        count = ray_workers(cfg, workers)
        actor = ray.remote(ShardWorker).options(
            num_cpus=1,
            num_gpus=gpus,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
        )
        # The GPU Ray gives an actor is its cuda:0, whatever number the driver's config names.
        # The config goes by value (it is small): a restarted actor gets its arguments again.
        worker_cfg = cfg.replace(device="cuda") if gpus else cfg
        # An actor has one CPU: it decodes in its own process; Ray scales by actors instead.
        worker_cfg = worker_cfg.replace(loader_workers=0)
        # ActorHandle[ShardWorker]s; Any because Ray types their methods without `.remote`
        self.actors: list[Any] = [actor.remote(worker_cfg) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.actors)

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class RayExecutor(Executor):
    """The passes on a Ray cluster. Actors start on the first pass that needs the model and
    live until `close`; emit alone (no model) runs as one Ray task per shard instead."""

    def __init__(self, cfg: Config, workers: int | None = None):
        connect()
        self.cfg, self.workers = cfg, workers
        self._pool: RayWorkers | None = None

    @property
    def pool(self) -> RayWorkers:
        if self._pool is None:
            self._pool = RayWorkers(self.cfg, self.workers)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def check(self, cfg: Config, refs: list[ShardRef]) -> None:
        """memory:// lives in one process: workers would read nothing and write into the void."""
        for url in (cfg.out, *(r.url for r in refs)):
            if url.startswith("memory:"):
                raise InputError(
                    f"{url}: memory:// is private to one process, Ray workers cannot see it; "
                    "use object storage (s3://, gs://) or a folder every node mounts"
                )

    def sketch_shards(self, ctx: StageContext) -> SketchResult:
        """One unit per worker (`plan_units`), each handed to the next free worker; worker 0
        replays the units' items and writes the sketch (no state visits the driver)."""
        actors = self.pool.actors
        units = plan_units(ctx.refs, len(actors))
        progress = Progress("pass 1 (sketch)", len(ctx.refs), ctx.cfg.progress)
        summaries: list[Any] = [None] * len(units)
        todo = list(range(len(units)))[::-1]  # popped from the end: unit order
        running: dict[Any, tuple[int, Any]] = {}  # summary future -> (unit, its actor)
        free = list(actors)
        refs = ray.put(ctx.refs)  # once in the object store, whatever the number of units
        with stage_errors():
            while todo or running:
                while todo and free:
                    i, actor = todo.pop(), free.pop(0)
                    running[actor.sketch_unit.remote(refs, i, len(units))] = (i, actor)
                ready, _ = ray.wait(list(running), num_returns=1)
                for done in ready:
                    i, actor = running.pop(done)
                    summaries[i] = ray.get(done)  # a failed unit raises now
                    free.append(actor)
                    lo, hi = units[i]
                    for ref in ctx.refs[lo:hi]:
                        progress.shard_done(ref.name)
            seconds = progress.close()
            return ray.get(actors[0].finish.remote(summaries, seconds))

    def score_shards(
        self, ctx: StageContext, refs: list[ShardRef], sketch: StoredSketch | None,
        progress: Progress,
    ) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Each shard goes to the next idle actor; counts come back in shard order."""
        if not refs:
            return
        with stage_errors():
            stored = ray.put(sketch)  # one copy in the object store, shared by every call
            actors = ActorPool(self.pool.actors[: len(refs)])
            for got in actors.map(lambda a, r: a.score.remote(r, stored), refs):
                progress.advance(got["seen"])
                yield got

    def emit_jobs(self, cfg: Config, jobs: list[EmitJob]) -> Iterator[dict[str, Any]]:
        """On the run's actors when they are up (their number of streams at once), else one
        Ray task per shard on every CPU of the cluster (no model is loaded for emit)."""
        if not jobs:
            return
        with stage_errors():
            if self._pool is not None:
                pool = ActorPool(self._pool.actors[: len(jobs)])
                yield from pool.map(lambda a, job: a.emit.remote(job), jobs)
                return
            task = ray.remote(emit_marked).options(num_cpus=1, max_retries=MAX_TASK_RETRIES)
            futures = [task.remote(cfg, job) for job in jobs]  # Ray runs them on every CPU
            for future in futures:
                yield ray.get(future)
