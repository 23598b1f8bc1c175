"""`--dry-run`: what a command would do, printed, with nothing written under OUT.

Where it sits: in front of the steps (cli.py calls `describe_plan` instead of the step). It
lists the inputs as the run would pin them (each shard's size and modification time or ETag),
says what OUT holds and whether this command may write there (a new output, a resume, a
finished run of this very command, a run in which no pass finished, or a refusal and why),
and for each step whether it would run, resume or be skipped. It reads the inputs' listing,
OUT and, for the steps that need it, the model (its fingerprint is part of the run's
identity); it takes no lease and writes nothing.
"""

from __future__ import annotations

from typing import Any

from .config import Config
from .inputs import expand_inputs
from .outputs.folder import OutputFolder, output_of
from .outputs.identity import run_identity
from .select.rules import SKETCHED, Rules
from .storage import pin_of

MODEL_STEPS = ("run", "sketch", "score")


def describe_plan(command: str, cfg: Config) -> str:
    """The plan of `sage-stream COMMAND` with these options (see the module docstring)."""
    folder = output_of(cfg)
    lines = [f"dry run of `sage-stream {command}`: nothing is written to {folder.url}"]
    refs = expand_inputs(cfg.inputs, cfg.storage_options) if cfg.inputs else []
    pins = [pin_of(r.url, cfg.storage_options) for r in refs]
    if refs:
        lines.append(f"  inputs: {len(refs)} shard(s)")
        lines += [f"    {r.url}  {pin}" for r, pin in zip(refs, pins, strict=True)]
        folder.refuse_inputs_inside(refs)
    if command in MODEL_STEPS:
        lines += _model_steps(command, cfg, folder, refs, pins)
    else:
        lines += _finishing_steps(command, cfg, folder, refs)
    return "\n".join(lines)


def _model_steps(
    command: str, cfg: Config, folder: OutputFolder, refs: list, pins: list[str]
) -> list[str]:
    import dataclasses

    from .passes.finished import finished_manifest
    from .passes.loop import build_context  # loads the model: its fingerprint is the identity

    rules = Rules(cfg.keep, cfg.min_score, cfg.balance, cfg.scorer, cfg.seed, cfg.dedup)
    pinned = [dataclasses.replace(r, pin=p) for r, p in zip(refs, pins, strict=True)]
    ctx = build_context(cfg, pinned)
    identity = run_identity(cfg, pinned, ctx.fingerprint)
    state, fresh = _out_state(cfg, folder, identity)
    model = f"  model: {cfg.model} (weights {ctx.fingerprint[:12]})"
    if command == "run" and finished_manifest(ctx, rules) is not None:
        return [model, "  OUT: holds a finished run of this command: every step skipped, "
                "nothing would be redone"]  # fmt: skip
    lines = [model, f"  OUT: {state}"]
    if state.startswith("REFUSED"):
        return lines
    sketched = cfg.scorer in SKETCHED
    if command in ("run", "sketch"):
        lines.append("  pass 1 (sketch): " + _sketch_state(folder, sketched, fresh))
    if command in ("run", "score"):
        done = 0 if fresh else sum(folder.exists(folder.part(r.name)) for r in refs)
        lines.append(f"  pass 2 (score): would score {len(refs) - done} shard(s), "
                     f"{done} already scored (skipped)")  # fmt: skip
    if command == "run":
        lines.append(f"  select: would choose ({_request(cfg)})")
        lines.append(f"  emit: would write {len(refs)} shard(s) to {folder.path('shards')}, "
                     "then manifest.json, shardindex.json and _SUCCESS")  # fmt: skip
    return lines


def _out_state(cfg: Config, folder: OutputFolder, identity: dict[str, Any]) -> tuple[str, bool]:
    """What OUT holds and what the claim would do; True when the run would start afresh."""
    stored = folder.stored_identity()
    if stored is None:
        return "new (or empty): a fresh run", True
    if stored == identity:
        return "holds a run of this configuration: it resumes", False
    changed = ", ".join(sorted(k for k in set(stored) | set(identity)
                               if stored.get(k) != identity.get(k)))  # fmt: skip
    if cfg.overwrite:
        return f"holds another run (differs in: {changed}): --overwrite would remove it", True
    if not folder.finished_work():
        return (f"holds a run in which no pass finished (differs in: {changed}): it would "
                "start again with this configuration"), True  # fmt: skip
    return (f"REFUSED: holds a run with another configuration (differs in: {changed}); use "
            "another --out, or --overwrite"), True  # fmt: skip


def _sketch_state(folder: OutputFolder, sketched: bool, fresh: bool) -> str:
    if not sketched:
        return "skipped (this scorer needs no sketch)"
    if not fresh and folder.exists(folder.sketch) and folder.sketch_store().is_complete():
        return "done (sketch.zarr complete): skipped"
    names = folder.names(folder.work()) if folder.exists(folder.work()) and not fresh else []
    saved = sum(n.startswith("pass1-unit-") for n in names)
    return f"would run (resuming from {saved} unit checkpoint(s))" if saved else "would run"


def _finishing_steps(command: str, cfg: Config, folder: OutputFolder, refs: list) -> list[str]:
    """select and emit: what OUT has for them."""
    scored = folder.scored_shards() if folder.exists(folder.scores) else []
    if command == "select":
        return [f"  select: would choose ({_request(cfg)}) over the scores of "
                f"{len(scored)} shard(s) in {folder.scores}"]  # fmt: skip
    names = [r.name for r in refs]
    missing = [n for n in names if n not in scored]
    return [f"  emit: would write {len(names)} shard(s) to {folder.path('shards')}"
            + (f"; {len(missing)} have no scores yet (emit would stop)" if missing else ""),
            "  then manifest.json, shardindex.json and _SUCCESS"]  # fmt: skip


def _request(cfg: Config) -> str:
    amount = f"keep {cfg.keep}" if cfg.keep is not None else f"min-score {cfg.min_score}"
    return f"{amount}, balance {cfg.balance}, scorer {cfg.scorer}, seed {cfg.seed}"
