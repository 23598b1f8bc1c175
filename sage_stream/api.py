"""The Python API: one function per step of the flow, and `run` for all of them.

    sketch(inputs, model=..., out=...)          pass 1  -> OUT/sketch.zarr
    score(inputs, model=..., out=...)           pass 2  -> OUT/scores/
    select(out=..., keep=0.3)                   select  -> OUT/selection.parquet
    emit(inputs, out=...)                       emit    -> OUT/shards/, manifest, index, _SUCCESS
    run(inputs, model=..., out=..., keep=0.3)   all of the above

Each function takes the options of `Config` its step uses as keywords (the CLI's flags with
`_` for `-`), or a `Config` as `config=` (a keyword given beats it), and returns a small result.
The signatures are written out for help() and IDEs; tests/test_options.py checks them against
`Config`. The CLI is a thin layer over these; `run` calls the same steps in one executor, so
that Ray actors load the model once for both passes. `select` never imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Config, make_config
from .errors import InputError
from .inputs import expand_inputs
from .outputs.folder import output_of
from .outputs.identity import pinned, run_config, run_identity, run_inputs
from .outputs.lease import hold
from .outputs.sketch_store import StoredSketch
from .outputs.stopped import Stage, recorded_stop
from .outputs.tables import read_part
from .passes.checks import nothing_scored
from .passes.emit import EmitResult
from .passes.select import SelectResult, run_select
from .select.rules import SKETCHED, Rules

if TYPE_CHECKING:  # these import torch: `select` alone never loads it
    from .executors import Executor
    from .passes.loop import StageContext
    from .passes.score import ScoreResult
    from .passes.sketch import SketchResult

log = logging.getLogger("sage_stream")
InputURLs = str | Sequence[str]


@dataclass
class RunResult:
    sketch: SketchResult | None
    score: ScoreResult
    select: SelectResult
    emit: EmitResult


# --- the steps, on a Config -------------------------------------------------------------------
def _claim(cfg: Config) -> StageContext:
    """Load the model and list the inputs (no lease: a bad input is reported before OUT is)."""
    from .passes.loop import build_context

    refs = pinned(expand_inputs(cfg.inputs, cfg.storage_options), cfg)
    output_of(cfg).refuse_inputs_inside(refs)
    return build_context(cfg, refs)


def _take(ctx: StageContext) -> None:
    """Claim OUT, under its lease: refuse a different earlier run before touching it."""
    cfg = ctx.cfg  # the run's
    ctx.out.refuse_foreign(cfg.inputs)
    ctx.out.claim(run_identity(cfg, ctx.refs, ctx.fingerprint), run_config(cfg), cfg.overwrite)
    ctx.out.clear_success()


def _stored_sketch(ctx: StageContext) -> StoredSketch | None:
    if ctx.cfg.scorer not in SKETCHED:
        return None  # the baselines rank by loss, gradient norm or chance: no sketch needed
    return ctx.out.sketch_store().read(expected=ctx.identity())


def _rules(cfg: Config) -> Rules:
    """The selection asked for (checked: exactly one of keep and min-score)."""
    return Rules(cfg.keep, cfg.min_score, cfg.balance, cfg.scorer, cfg.seed, cfg.dedup)


def _select(cfg: Config, shards: list[str]) -> SelectResult:  # shard by shard: flat memory
    return run_select(output_of(cfg), _rules(cfg), shards, cfg.checkpoint)


def _sketch_stats(cfg: Config) -> dict[str, Any] | None:
    folder = output_of(cfg)
    if cfg.scorer not in SKETCHED or not folder.exists(folder.sketch):
        return None
    head = folder.sketch_store().header()  # metadata only: emit never needs the basis
    return {**head["stats"], "identity": head["identity"]}


def _run(cfg: Config) -> RunResult:
    from .passes.finished import finished_manifest, recorded_results

    rules = _rules(cfg)  # a run that cannot select is refused before it starts
    ctx = _claim(cfg)
    with hold(output_of(cfg), cfg.force_unlock):
        manifest = finished_manifest(ctx, rules)
        if manifest is not None:  # a finished output of this very command
            return RunResult(*recorded_results(ctx, manifest, cfg.scorer in SKETCHED))
        _take(ctx)
        with recorded_stop(ctx.out, "sketch") as stage:
            return _run_held(cfg, ctx, stage)


def _executor(cfg: Config) -> AbstractContextManager[Executor]:
    from .executors import open_executor  # torch comes with it: not for `select` alone

    return open_executor(cfg)


def _run_held(cfg: Config, ctx: StageContext, stage: Stage) -> RunResult:
    with _executor(cfg) as executor:
        sketched = executor.sketch(ctx) if cfg.scorer in SKETCHED else None
        stage.step = "score"
        scored = executor.score(ctx, _stored_sketch(ctx))
        if scored.scored == 0:
            parts = (read_part(ctx.out, r.name, ["reason"])[0] for r in ctx.refs)
            raise nothing_scored(scored.errored, scored.shard_errors, parts, ctx.out.scores)
        stage.step = "select"
        chosen = _select(cfg, [r.name for r in ctx.refs])
        stage.step = "emit"
        emitted = executor.emit(cfg, ctx.refs, _sketch_stats(cfg))
    return RunResult(sketched, scored, chosen, emitted)


def _pass(cfg: Config, name: str, step: Callable[[Executor, StageContext], Any]) -> Any:
    ctx = _claim(cfg)
    with hold(output_of(cfg), cfg.force_unlock):
        _take(ctx)
        with recorded_stop(ctx.out, name), _executor(cfg) as executor:
            return step(executor, ctx)


# Options whose API default None stands for Config's empty value (an explicit None too).
_EMPTY_WHEN_NONE = ("inputs", "out", "model_args", "storage_options")


def _options(step: Callable[..., Any]) -> Callable[..., Any]:
    """Give a public step its Config: `config=` if given, then every keyword the caller passed
    on top (an explicit keyword always wins, even one equal to the default). The step itself
    is called with that Config only; its signature stays what help() and IDEs show."""
    signature = inspect.signature(step)

    @functools.wraps(step)
    def with_config(*args: Any, **kwargs: Any) -> Any:
        given = dict(signature.bind(*args, **kwargs).arguments)
        config = given.pop("config", None)
        base = (
            {f.name: getattr(config, f.name) for f in dataclasses.fields(config)} if config else {}
        )
        for name in _EMPTY_WHEN_NONE:
            if name in given and given[name] is None:
                given[name] = getattr(Config(), name)  # a fresh (), "" or {}
        cfg = make_config(**{**base, **given})
        if not cfg.out:
            raise InputError("no output: pass --out URL")
        return step(config=cfg)

    return with_config


# --- the public steps ------------------------------------------------------------------------
@_options
def sketch(
    inputs: InputURLs | None = None,
    *,
    out: str | None = None,
    model: Any = None,
    checkpoint: str | None = None,
    model_args: dict[str, Any] | None = None,
    output_key: str | None = None,
    input_key: str | None = None,
    label_key: str | None = Config.label_key,
    key_column: str = Config.key_column,
    preprocess: Any = None,
    resize: int | None = None,
    crop: int | None = None,
    normalize: str | None = None,
    image_mode: str | None = None,
    tokenizer: str | None = None,
    max_length: int | None = None,
    grad: str = Config.grad,
    head: str | None = None,
    params: str | None = None,
    project_dim: int | None = None,
    ell: int = Config.ell,
    batch_size: int = Config.batch_size,
    chunk_size: int = Config.chunk_size,
    device: str = Config.device,
    precision: str = Config.precision,
    loader_workers: int | None = None,
    seed: int = Config.seed,
    on_error: str = Config.on_error,
    max_member_bytes: int | str = Config.max_member_bytes,
    max_sample_bytes: int | str = Config.max_sample_bytes,
    storage_options: dict[str, Any] | None = None,
    executor: str = Config.executor,
    workers: int | None = None,
    scorer: str = Config.scorer,
    consensus: str = Config.consensus,
    overwrite: bool = Config.overwrite,
    force_unlock: bool = Config.force_unlock,
    checkpoint_every: float = Config.checkpoint_every,
    feature_cache: int | str = Config.feature_cache,
    progress: bool | None = None,
    config: Config | None = None,
) -> SketchResult:
    """Pass 1: stream the shards into an FD sketch of per-sample gradients (OUT/sketch.zarr).

    `model` is a factory "module:function", a callable or an nn.Module; `checkpoint` a state
    dict URL. The options are `Config`'s (see `sage-stream sketch --help`).
    """
    assert config is not None  # given by @_options
    return _pass(config, "sketch", lambda ex, ctx: ex.sketch(ctx))


@_options
def score(
    inputs: InputURLs | None = None,
    *,
    out: str | None = None,
    model: Any = None,
    checkpoint: str | None = None,
    model_args: dict[str, Any] | None = None,
    output_key: str | None = None,
    input_key: str | None = None,
    label_key: str | None = Config.label_key,
    key_column: str = Config.key_column,
    preprocess: Any = None,
    resize: int | None = None,
    crop: int | None = None,
    normalize: str | None = None,
    image_mode: str | None = None,
    tokenizer: str | None = None,
    max_length: int | None = None,
    grad: str = Config.grad,
    head: str | None = None,
    params: str | None = None,
    project_dim: int | None = None,
    ell: int = Config.ell,
    batch_size: int = Config.batch_size,
    chunk_size: int = Config.chunk_size,
    device: str = Config.device,
    precision: str = Config.precision,
    loader_workers: int | None = None,
    seed: int = Config.seed,
    on_error: str = Config.on_error,
    max_member_bytes: int | str = Config.max_member_bytes,
    max_sample_bytes: int | str = Config.max_sample_bytes,
    storage_options: dict[str, Any] | None = None,
    executor: str = Config.executor,
    workers: int | None = None,
    scorer: str = Config.scorer,
    consensus: str = Config.consensus,
    overwrite: bool = Config.overwrite,
    force_unlock: bool = Config.force_unlock,
    checkpoint_every: float = Config.checkpoint_every,
    progress: bool | None = None,
    config: Config | None = None,
) -> ScoreResult:
    """Pass 2: a score for every sample against the stored sketch (OUT/scores/).

    The same options as `sketch`, which must match the sketch's (else MismatchError).
    """
    assert config is not None  # given by @_options
    cfg = config
    return _pass(cfg, "score", lambda ex, ctx: ex.score(ctx, _stored_sketch(ctx)))


@_options
def select(
    inputs: InputURLs | None = None,
    *,
    out: str | None = None,
    keep: float | None = None,
    min_score: float | None = None,
    balance: str = Config.balance,
    scorer: str = Config.scorer,
    dedup: str = Config.dedup,
    seed: int = Config.seed,
    storage_options: dict[str, Any] | None = None,
    force_unlock: bool = Config.force_unlock,
    config: Config | None = None,
) -> SelectResult:
    """Choose the kept samples from OUT/scores/ (OUT/selection.parquet).

    `keep` is a fraction of the scored samples, or `min_score` a threshold; `inputs`, if
    given, must be the run's (else the shards that have scores are used).
    """
    assert config is not None  # given by @_options
    cfg = config
    folder = output_of(cfg)
    with hold(folder, cfg.force_unlock), recorded_stop(folder, "select"):
        shards = [r.name for r in run_inputs(cfg, folder)] if cfg.inputs else folder.scored_shards()
        return _select(cfg, shards)


@_options
def emit(
    inputs: InputURLs | None = None,
    *,
    out: str | None = None,
    key_column: str = Config.key_column,
    max_member_bytes: int | str = Config.max_member_bytes,
    max_sample_bytes: int | str = Config.max_sample_bytes,
    scorer: str = Config.scorer,
    storage_options: dict[str, Any] | None = None,
    loader_workers: int | None = None,
    executor: str = Config.executor,
    workers: int | None = None,
    progress: bool | None = None,
    force_unlock: bool = Config.force_unlock,
    config: Config | None = None,
) -> EmitResult:
    """Write the kept samples, byte for byte, into OUT/shards/; then manifest and _SUCCESS.

    `inputs` must be the run's. With `executor="ray"` each shard is one Ray task.
    """
    assert config is not None  # given by @_options
    cfg = config
    folder = output_of(cfg)
    with hold(folder, cfg.force_unlock), recorded_stop(folder, "emit"):
        refs = run_inputs(cfg, folder)
        folder.clear_success()
        with _executor(cfg) as executor_:
            return executor_.emit(cfg, refs, _sketch_stats(cfg))


@_options
def run(
    inputs: InputURLs | None = None,
    *,
    out: str | None = None,
    model: Any = None,
    keep: float | None = None,
    min_score: float | None = None,
    balance: str = Config.balance,
    scorer: str = Config.scorer,
    dedup: str = Config.dedup,
    checkpoint: str | None = None,
    model_args: dict[str, Any] | None = None,
    output_key: str | None = None,
    input_key: str | None = None,
    label_key: str | None = Config.label_key,
    key_column: str = Config.key_column,
    preprocess: Any = None,
    resize: int | None = None,
    crop: int | None = None,
    normalize: str | None = None,
    image_mode: str | None = None,
    tokenizer: str | None = None,
    max_length: int | None = None,
    grad: str = Config.grad,
    head: str | None = None,
    params: str | None = None,
    project_dim: int | None = None,
    ell: int = Config.ell,
    batch_size: int = Config.batch_size,
    chunk_size: int = Config.chunk_size,
    device: str = Config.device,
    precision: str = Config.precision,
    loader_workers: int | None = None,
    seed: int = Config.seed,
    on_error: str = Config.on_error,
    max_member_bytes: int | str = Config.max_member_bytes,
    max_sample_bytes: int | str = Config.max_sample_bytes,
    storage_options: dict[str, Any] | None = None,
    executor: str = Config.executor,
    workers: int | None = None,
    consensus: str = Config.consensus,
    overwrite: bool = Config.overwrite,
    force_unlock: bool = Config.force_unlock,
    checkpoint_every: float = Config.checkpoint_every,
    feature_cache: int | str = Config.feature_cache,
    progress: bool | None = None,
    config: Config | None = None,
) -> RunResult:
    """All steps: sketch (for the sage and sage-coverage scorers), score, select, emit.

        sage_stream.run("s3://bucket/train/shard-{000..099}.tar", model="mymodels:proxy",
                        checkpoint="s3://bucket/proxy.pt", out="s3://bucket/sel", keep=0.3)

    `keep` (a fraction) or `min_score` (a threshold) says how much to keep; `balance` how the
    budget is shared between classes (proportional | equal | none); `scorer` sage-coverage
    (default), sage or a baseline (loss, loss-easy, grad-norm, random); `dedup` whether
    near-copies collapse to one first (off | on). The other
    options are `sketch`'s.
    """
    assert config is not None  # given by @_options
    return _run(config)
