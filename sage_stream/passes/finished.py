"""A rerun of a finished output: when nothing would change, nothing is redone, and it says so.

Where it sits: `run` asks here first, under OUT's lease, before it claims OUT (which would
clear `_SUCCESS`). An output is finished for a command when `_SUCCESS` is there and its
manifest records the same run identity (the same model weights, options and input pins), the
same configuration and the same selection request: every step would then write the bytes
already there. The result is read back from the manifest and the sketch's metadata.
"""

from __future__ import annotations

import logging
from typing import Any

from ..outputs.identity import run_config, run_identity
from ..select.rules import Rules
from .emit import EmitResult
from .loop import StageContext
from .score import ScoreResult
from .select import SelectResult
from .sketch import SketchResult, stored_result

log = logging.getLogger("sage_stream")


def finished_manifest(ctx: StageContext, rules: Rules) -> dict[str, Any] | None:
    """The manifest of OUT if OUT is a finished run of exactly this command, else None."""
    folder, cfg = ctx.out, ctx.cfg
    if cfg.overwrite or not folder.is_complete():
        return None
    manifest = folder.read_json(folder.manifest) or {}
    if manifest.get("identity") != run_identity(cfg, ctx.refs, ctx.fingerprint):
        return None
    if manifest.get("config") != run_config(cfg):
        return None
    recorded, asked = manifest.get("selection") or {}, rules.params()
    if any(recorded.get(k) != asked.get(k) for k in {*asked, "dedup"}):  # dedup: only if on
        return None
    return manifest


def recorded_results(
    ctx: StageContext, manifest: dict[str, Any], sketched: bool
) -> tuple[SketchResult | None, ScoreResult, SelectResult, EmitResult]:
    """The results of the finished run, as the steps returned them (times 0). A run killed
    after `_SUCCESS` but before its scratch went leaves `_work/`: it goes now, as the commit's
    last step would have removed it."""
    folder, totals = ctx.out, manifest["totals"]
    if folder.exists(folder.work()):
        folder.finish()
    sketch = stored_result(ctx) if sketched else None
    errors = [{"shard": s["name"], "url": s["url"], "reason": s["shard_error"]}
              for s in manifest.get("shard_errors", [])]  # fmt: skip
    score = ScoreResult(folder.scores, totals["seen"], totals["scored"], totals["errored"],
                        errors, 0.0)  # fmt: skip
    params = manifest.get("selection") or {}
    chosen = SelectResult(folder.selection, totals["scored"], totals["kept"], params,
                          list(params.get("warnings", [])))  # fmt: skip
    emitted = EmitResult(ctx.cfg.out or folder.url, totals, manifest["outputs"], 0.0)
    log.info("%s is complete for this command (same model, options, inputs and selection): "
             "nothing was redone; kept %d of %d scored", folder.url, totals["kept"],
             totals["scored"])  # fmt: skip
    return sketch, score, chosen, emitted
