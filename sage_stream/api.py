"""The Python API: one function per step of the flow, and `run` for all of them.

    sketch(inputs, model=..., out=...)          pass 1  -> OUT/sketch.zarr
    score(inputs, model=..., out=...)           pass 2  -> OUT/scores/
    select(out=..., keep=0.3)                   select  -> OUT/selection.parquet
    emit(inputs, out=...)                       emit    -> OUT/shards/, manifest, index, _SUCCESS
    run(inputs, model=..., out=..., keep=0.3)   all of the above

Every function takes the options of `Config` as keyword arguments (the CLI's flags with `_`
for `-`) and returns a small result object. The CLI is a thin layer over these.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .config import Config, make_config
from .emit import EmitResult, clear_success, run_emit
from .errors import InputError, MismatchError
from .passes.context import StageContext, build_context
from .passes.scoring import ScoreResult, run_score_pass
from .passes.sketching import SketchResult, run_sketch_pass
from .resume import claim_output, run_identity, stored_identity
from .sample import ShardRef
from .selection import select as select_rows
from .storage import exists, join
from .store import StoredSketch, read_sketch
from .tables import errored_count, read_scores, scored_shards, write_selection
from .urls import expand_inputs

log = logging.getLogger("sage_stream")


def _config(inputs: Any = None, /, **options: Any) -> Config:
    if inputs is not None:
        options["inputs"] = inputs
    cfg = make_config(**options)
    if not cfg.out:
        raise InputError("no output: pass --out URL")
    return cfg


def _start(cfg: Config) -> StageContext:
    """Load the model, then claim OUT: refuse a different earlier run before touching it."""
    ctx = build_context(cfg)
    claim_output(cfg, run_identity(cfg, ctx.refs, ctx.fingerprint))
    clear_success(cfg.out, cfg.storage_options)
    return ctx


@dataclass
class Passes:
    """The passes as one executor runs them: in this process, or shard-parallel on Ray."""

    sketch: Callable[[StageContext], SketchResult]
    score: Callable[[StageContext, StoredSketch | None], ScoreResult]
    emit: Callable[[Config, list[ShardRef], dict | None], EmitResult]


@contextlib.contextmanager
def executor(cfg: Config) -> Iterator[Passes]:
    """`--executor local` runs the shard loops here; `ray` runs them on a pool of actors that
    lives for the whole run (one model load per actor). Ray is imported only in that case."""
    if cfg.executor != "ray":
        yield Passes(run_sketch_pass, run_score_pass, run_emit)
        return
    from .executors import ray as on_ray

    with on_ray.RayWorkers(cfg, cfg.workers) as workers:
        yield Passes(
            lambda ctx: on_ray.sketch_pass(ctx.cfg, ctx.refs, workers),
            lambda ctx, stored: on_ray.score_pass(ctx.cfg, ctx.refs, stored, workers),
            lambda cfg, refs, stats: on_ray.emit_pass(cfg, refs, stats, workers),
        )


def sketch(inputs: Any, **options: Any) -> SketchResult:
    """Pass 1: stream the shards into an FD sketch of per-sample gradients (OUT/sketch.zarr)."""
    ctx = _start(_config(inputs, **options))
    with executor(ctx.cfg) as passes:
        return passes.sketch(ctx)


def _stored_sketch(cfg: Config, identity: dict[str, Any]) -> StoredSketch | None:
    if cfg.scorer != "sage":
        return None  # the baselines rank by loss, gradient norm or chance: no sketch needed
    return read_sketch(
        join(cfg.out, "sketch.zarr"), expected=identity, storage_options=cfg.storage_options
    )


def score(inputs: Any, **options: Any) -> ScoreResult:
    """Pass 2: a score for every sample against the stored sketch (OUT/scores/)."""
    ctx = _start(_config(inputs, **options))
    with executor(ctx.cfg) as passes:
        return passes.score(ctx, _stored_sketch(ctx.cfg, ctx.identity()))


@dataclass
class SelectResult:
    url: str
    scored: int
    kept: int
    params: dict[str, Any]


def select(**options: Any) -> SelectResult:
    """Choose the kept samples from OUT/scores/ (OUT/selection.parquet)."""
    cfg = _config(None, **options)
    if cfg.keep is None and cfg.min_score is None:
        raise InputError("say how much to keep: --keep FRACTION or --min-score T")
    if cfg.inputs:
        shards = [r.name for r in _run_inputs(cfg)]
    else:
        shards = scored_shards(cfg.out, cfg.storage_options)
    table = read_scores(cfg.out, shards, storage_options=cfg.storage_options)
    if cfg.scorer == "sage" and table.num_rows and table["score"].null_count == table.num_rows:
        raise InputError(
            f"the scores under {cfg.out} have no SAGE score: run `sage-stream sketch` and `score`, or choose another --scorer"
        )
    chosen = select_rows(
        table,
        keep=cfg.keep,
        balance=cfg.balance,
        min_score=cfg.min_score,
        scorer=cfg.scorer,
        seed=cfg.seed,
    )
    params = {
        "keep": cfg.keep,
        "balance": cfg.balance,
        "min_score": cfg.min_score,
        "scorer": cfg.scorer,
        "seed": cfg.seed,
    }
    clear_success(cfg.out, cfg.storage_options)  # only now: a refused select changes nothing
    url = write_selection(cfg.out, chosen, params, cfg.storage_options)
    scored = table.num_rows - errored_count(table)
    return SelectResult(url, scored, chosen.num_rows, params)


def _run_inputs(cfg: Config) -> list[ShardRef]:
    """The inputs of a step that finishes an earlier run: they must be that run's inputs, or
    the scores of one data set would be attached to another's samples."""
    refs = expand_inputs(cfg.inputs, cfg.storage_options)
    stored = stored_identity(cfg.out, cfg.storage_options)
    if stored is not None and [r.url for r in refs] != stored["inputs"]:
        raise MismatchError(
            f"these inputs are not the ones {cfg.out} was scored from ({len(refs)} shards "
            f"given, {len(stored['inputs'])} in the run): pass the run's inputs, in order"
        )
    return refs


def _sketch_stats(cfg: Config) -> dict[str, Any] | None:
    if cfg.scorer != "sage" or not exists(join(cfg.out, "sketch.zarr"), cfg.storage_options):
        return None
    stored = read_sketch(join(cfg.out, "sketch.zarr"), storage_options=cfg.storage_options)
    return {**stored.stats, "identity": stored.identity}


def emit(inputs: Any, **options: Any) -> EmitResult:
    """Write the kept samples, byte for byte, into OUT/shards/; then manifest and _SUCCESS."""
    cfg = _config(inputs, **options)
    refs = _run_inputs(cfg)
    clear_success(cfg.out, cfg.storage_options)
    if cfg.executor == "ray":  # shard-parallel tasks; no model, so no actor pool
        from .executors import ray as on_ray

        return on_ray.emit_pass(cfg, refs, _sketch_stats(cfg))
    return run_emit(cfg, refs, _sketch_stats(cfg))


@dataclass
class RunResult:
    sketch: SketchResult | None
    score: ScoreResult
    select: SelectResult
    emit: EmitResult


def run(inputs: Any, **options: Any) -> RunResult:
    """All steps: sketch (for the sage scorer), score, select, emit."""
    cfg = _config(inputs, **options)
    if cfg.keep is None and cfg.min_score is None:
        raise InputError("say how much to keep: --keep FRACTION or --min-score T")
    ctx = _start(cfg)
    options = {**options, "inputs": tuple(r.url for r in ctx.refs)}
    with executor(cfg) as passes:
        sketched = passes.sketch(ctx) if cfg.scorer == "sage" else None
        scored = passes.score(ctx, _stored_sketch(cfg, ctx.identity()))
        if scored.scored == 0:
            raise InputError(
                f"no sample could be scored ({scored.errored} errors): see the reasons in "
                f"{join(cfg.out, 'scores')}, or run with --on-error fail to stop at the first"
            )
        chosen = select(**options)
        emitted = passes.emit(cfg, ctx.refs, _sketch_stats(cfg))
    return RunResult(sketched, scored, chosen, emitted)
