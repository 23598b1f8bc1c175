"""`--executor ray`: the same passes, shard-parallel on a Ray cluster (DESIGN.md §6).

Where it sits: `api` calls these instead of the local loops in `passes/` and `emit`; the steps
themselves are unchanged (they run inside `ray_worker.ShardWorker`). The driver only plans,
dispatches and collects small results; the data never flows through it.

    workers  `RayWorkers`: one actor per GPU (or CPU slot), each loading the model once, shared
             by the passes of a run
    pass 1   shards split into contiguous blocks, one per worker; each worker sketches its
             block in input order into one partial (FD rows + class sums); worker 0 merges the
             partials in block order and writes sketch.zarr
    pass 2   shards handed to the next idle worker; each writes scores/part-<shard>.parquet;
             centroid consensus is then scored on the driver
    emit     shards handed to the workers (or one Ray task per shard, when emit runs alone);
             then manifest, index and _SUCCESS on the driver

Why contiguous blocks and not a partial per shard: with one worker this is exactly the local
run's state (byte-identical outputs); a fixed plan merged in a fixed order makes the result
independent of scheduling; and only `workers` partials of O(ℓ·D + C·D) travel through the
object store, not one per shard. The cost is no load balancing in pass 1 (a slow block holds
the pass); pass 2 and emit balance dynamically.

Faults: actors restart after a crash (`MAX_RESTARTS`) and the call in flight is retried
(`MAX_TASK_RETRIES`): a retried block resumes from its last checkpoint in OUT/_work/, a retried
shard rewrites its part whole, so no sample is counted twice. A restarted driver resumes from
the same checkpoints. Errors of the stage itself (bad input under --on-error fail, a sketch
from another model) are not retried: they come back as the typed error the local run raises.

Only this module imports Ray, and only `api` imports this module, when asked to.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from ..config import Config
from ..emit import EmitResult, emit_marked, finish_emit, kept_by_shard
from ..errors import InputError, SageError
from ..passes.centroid import rescore_with_centroids
from ..passes.scoring import ScoreResult
from ..passes.sketching import SketchResult
from ..progress import Progress
from ..resume import read_json, selection_hash, work_url
from ..sample import ShardRef
from ..storage import exists, join
from ..store import StoredSketch, open_group
from ..tables import errored_count, part_url, read_part, read_selection
from .ray_worker import ShardWorker, plan_blocks

try:
    import ray
    from ray.util import ActorPool
except ImportError:  # pragma: no cover - depends on the environment
    raise InputError("--executor ray needs Ray: pip install 'sage-stream[ray]'") from None

log = logging.getLogger("sage_stream")
MAX_RESTARTS = 3  # per actor: a node lost or a worker OOM-killed more often than this is fatal
MAX_TASK_RETRIES = 3  # per call in flight when its actor (or task worker) died


def connect() -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS, or start a local one."""
    if not ray.is_initialized():
        ray.init()


def gpus_per_worker(cfg: Config) -> int:
    """1 when the model should run on CUDA on the cluster, else 0 (CPU workers)."""
    if cfg.device.startswith("cuda"):
        return 1
    if cfg.device == "auto":
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return 0


def resolve_workers(cfg: Config, workers: int | None) -> int:
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


def check_urls(cfg: Config, refs: list[ShardRef]) -> None:
    """memory:// lives in one process: Ray workers would read nothing and write into the void."""
    for url in (cfg.out, *(r.url for r in refs)):
        if url.startswith("memory:"):
            raise InputError(
                f"{url}: memory:// is private to one process, Ray workers cannot see it; "
                "use object storage (s3://, gs://) or a folder every node mounts"
            )


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
    """The worker actors of a run: one model load each, shared by the passes, then stopped.

        with RayWorkers(cfg, 4) as workers:
            sketch_pass(cfg, refs, workers)
            score_pass(cfg, refs, sketch, workers)

    A pass given a number (or None) instead starts its own workers and stops them after.
    """

    def __init__(self, cfg: Config, workers: int | None = None):
        connect()
        gpus = gpus_per_worker(cfg)
        count = resolve_workers(cfg, workers)
        actor = ray.remote(ShardWorker).options(
            num_cpus=1,
            num_gpus=gpus,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
        )
        # The GPU Ray gives an actor is its cuda:0, whatever number the driver's config names.
        # The config goes by value (it is small): a restarted actor gets its arguments again.
        worker_cfg = cfg.replace(device="cuda") if gpus else cfg
        self.actors = [actor.remote(worker_cfg) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.actors)

    def __enter__(self) -> RayWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


@contextlib.contextmanager
def _workers_for_pass(cfg: Config, workers: int | RayWorkers | None) -> Iterator[RayWorkers]:
    if isinstance(workers, RayWorkers):
        yield workers
    else:
        with RayWorkers(cfg, workers) as started:
            yield started


def _when_done(futures: list[Any]) -> Iterator[Any]:
    """Yield futures as they complete (for progress), without fetching their values."""
    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0, fetch_local=False)
        yield from ready


def sketch_pass(
    cfg: Config, refs: list[ShardRef], workers: int | RayWorkers | None = None
) -> SketchResult:
    """Pass 1 on the cluster; same result type and store output as `run_sketch_pass`.

    A finished sketch with this identity is reused, and unfinished blocks resume from their
    checkpoints in OUT/_work/, so a restarted driver redoes only what was not saved.
    """
    connect()
    check_urls(cfg, refs)
    with _workers_for_pass(cfg, workers) as pool, stage_errors():
        done = ray.get(pool.actors[0].stored_sketch.remote())
        if done is not None:
            log.info("pass 1: %s is complete, nothing to do", done.url)
            return done
        return _sketch_blocks(cfg, pool.actors, plan_blocks(refs, len(pool)), len(refs))


def _sketch_blocks(
    cfg: Config, actors: list[Any], blocks: list[list[ShardRef]], shards: int
) -> SketchResult:
    progress = Progress("pass 1 (sketch)", shards, cfg.progress)
    n = len(blocks)
    busy = actors[:n]  # fewer shards than workers: the rest wait for pass 2
    partials = [
        a.sketch_block.remote(b, i, n) for i, (a, b) in enumerate(zip(busy, blocks, strict=True))
    ]
    block_of = dict(zip(partials, blocks, strict=True))
    for finished in _when_done(partials):
        ray.get(finished)  # a failed block raises now, not after the others finish
        for ref in block_of[finished]:
            progress.shard_done(ref.name)
    seconds = progress.close()
    # Worker 0 merges: it has the model's device, and the partials never visit the driver.
    return ray.get(actors[0].finish.remote(partials, seconds))


def score_pass(
    cfg: Config,
    refs: list[ShardRef],
    sketch: StoredSketch | None,
    workers: int | RayWorkers | None = None,
) -> ScoreResult:
    """Pass 2 on the cluster; same result and scores/ (and projections) as `run_score_pass`.

    Shards whose part exists are done (parts are written atomically) and are not scored again.
    """
    connect()
    check_urls(cfg, refs)
    centroid = sketch is not None and cfg.consensus == "centroid"
    if centroid:  # created once here: workers racing to create it could fail
        url = join(cfg.out, "sketch.zarr")
        open_group(url, "a", cfg.storage_options).require_group("projections")
    progress = Progress("pass 2 (score)", len(refs), cfg.progress)
    counts = _finished_parts(cfg, refs)
    todo = [ref for ref in refs if ref.name not in counts]
    if todo:
        counts.update(_score_shards(cfg, todo, sketch, workers, progress))
    seen = sum(counts[r.name]["seen"] for r in refs)
    scored = sum(counts[r.name]["scored"] for r in refs)
    shard_errors = [
        {"shard": r.name, "url": r.url, "reason": counts[r.name]["error"]}
        for r in refs
        if counts[r.name]["error"] is not None
    ]
    if centroid:  # the consensus needs every z first; it reads the stored z, no model
        classes, ell = sketch.consensus.shape
        scored = rescore_with_centroids(cfg, refs, classes, ell)
    seconds = progress.close()
    return ScoreResult(join(cfg.out, "scores"), seen, scored, seen - scored, shard_errors, seconds)


def _finished_parts(cfg: Config, refs: list[ShardRef]) -> dict[str, dict[str, Any]]:
    found = {}
    for ref in refs:
        if exists(part_url(cfg.out, ref.name), cfg.storage_options):
            table, error = read_part(cfg.out, ref.name, ["status"], cfg.storage_options)
            errored = errored_count(table)
            found[ref.name] = {"seen": table.num_rows, "scored": table.num_rows - errored}
            found[ref.name]["error"] = error
    return found


def _score_shards(
    cfg: Config,
    refs: list[ShardRef],
    sketch: StoredSketch | None,
    workers: int | RayWorkers | None,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Score `refs` on the actors: each shard goes to the next idle one."""
    counts = {}
    with _workers_for_pass(cfg, workers) as pool, stage_errors():
        stored = ray.put(sketch)  # one copy in the object store, shared by every call
        actors = ActorPool(pool.actors[: len(refs)])
        results = actors.map(lambda a, r: a.score.remote(r, stored), refs)  # in shard order
        for ref, got in zip(refs, results, strict=True):
            counts[ref.name] = got
            progress.advance(got["seen"])
            progress.shard_done(ref.name)
    return counts


def emit_pass(
    cfg: Config,
    refs: list[ShardRef],
    sketch_stats: dict | None,
    workers: RayWorkers | None = None,
) -> EmitResult:
    """Emit on the cluster, shard-parallel, skipping shards already emitted for this selection;
    then the same manifest, index and `_SUCCESS` as `emit.run_emit` (`emit.finish_emit`).

    On the run's `workers` when given (started already; their number of streams at once), else
    one Ray task per shard on every CPU of the cluster (no model is loaded for emit).
    """
    connect()
    check_urls(cfg, refs)
    selection, params = read_selection(cfg.out, cfg.storage_options)
    kept = kept_by_shard(selection)
    scorer = params.get("scorer", cfg.scorer)
    markers = work_url(cfg.out, f"emitted-{selection_hash(cfg.out, cfg.storage_options)}")
    progress = Progress("emit", len(refs), cfg.progress)
    shards = {r.name: read_json(join(markers, r.name), cfg.storage_options) for r in refs}
    todo = [r for r in refs if shards[r.name] is None]
    jobs = [(r, kept.get(r.name, set()), scorer, join(markers, r.name)) for r in todo]
    with stage_errors():
        for ref, counts in zip(todo, _emit_jobs(cfg, jobs, workers), strict=True):
            shards[ref.name] = counts
            progress.advance(counts["kept"])
            progress.shard_done(ref.name)
    seconds = progress.close()
    return finish_emit(cfg, [shards[r.name] for r in refs], params, sketch_stats, seconds)


def _emit_jobs(cfg: Config, jobs: list[tuple], workers: RayWorkers | None) -> Iterator[dict]:
    """Counts of each emitted shard, in the order of `jobs`."""
    if not jobs:
        return iter(())
    if workers is not None:
        pool = ActorPool(workers.actors[: len(jobs)])
        return pool.map(lambda a, job: a.emit.remote(*job), jobs)
    if ray.available_resources().get("CPU", 0) < 1:
        log.warning(
            "emit: no CPU of the Ray cluster is free; the emit tasks wait for one (stop the "
            "workers of the passes first, or pass them to emit_pass)"
        )
    task = ray.remote(emit_marked).options(num_cpus=1, max_retries=MAX_TASK_RETRIES)
    futures = [task.remote(cfg, *job) for job in jobs]  # all submitted; Ray runs them on every CPU
    return (ray.get(future) for future in futures)
