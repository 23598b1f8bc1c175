"""`sage-stream inspect URL`: a plain-text summary of what a run wrote, read from storage only.

URL may be a run's OUT folder, its sketch.zarr, its scores/ folder, or one scores part.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa

from .errors import InputError
from .outputs import decisions_file
from .outputs.folder import SCORES, SKETCH, OutputFolder
from .outputs.lease import lease_url
from .outputs.selection_file import SelectionFile
from .outputs.sketch_store import SketchStore
from .outputs.stopped import read_stop
from .outputs.tables import read_table
from .storage import exists, join, list_names


def _sketch_summary(url: str, storage_options: dict) -> str:
    store = SketchStore(url, storage_options)
    head = store.header()  # metadata, σ and the class counts: the basis is never read
    stats, sigma = head["stats"], store.singular_values()
    assert sigma is not None  # header() found the sketch complete
    counts = store.class_counts().tolist()
    lines = [
        f"sketch {url}",
        f"  ℓ={sigma.shape[0]}  D={head['dim']}  C={len(counts)}  rows={stats['n']}",
        f"  ‖A‖²_F={stats['frobenius_sq']:.6g}  Δ={stats['delta']:.6g}  "
        f"Δ/‖A‖²_F={stats['relative_error_bound']:.4f}  captured={stats['captured']:.4f}",
        f"  top singular values: {', '.join(f'{v:.4g}' for v in sigma[:8])}",
        f"  class counts: {counts}",
        f"  identity: {json.dumps(head['identity'], sort_keys=True)}",
    ]
    return "\n".join(lines)


def _scores_table(url: str, storage_options: dict) -> pa.Table:
    if url.endswith(".parquet"):
        urls = [url]
    else:
        urls = [join(url, n) for n in list_names(url, storage_options) if n.endswith(".parquet")]
    tables = [read_table(u, storage_options=storage_options).replace_schema_metadata(None)
              for u in urls]  # fmt: skip
    if not tables:
        raise InputError(f"no scores parts under {url}")
    return pa.concat_tables(tables)


def _scores_summary(url: str, storage_options: dict) -> str:
    table = _scores_table(url, storage_options)
    status = Counter(table["status"].to_pylist())
    reasons = Counter(r for r in table["reason"].to_pylist() if r)
    lines = [f"scores {url}: {table.num_rows} samples, {dict(sorted(status.items()))}"]
    lines += [f"  error: {n} × {reason}" for reason, n in reasons.most_common(10)]
    scores = np.array([v for v in table["score"].to_pylist() if v is not None], dtype=float)
    if scores.size:
        q = np.quantile(scores, [0, 0.1, 0.5, 0.9, 1])
        lines.append("  score quantiles 0/10/50/90/100%: " + "  ".join(f"{v:+.3f}" for v in q))
    return "\n".join(lines)


def _output_summary(url: str, storage_options: dict) -> str:
    """A run that reached emit. The selection and kept counts come from selection.parquet, the
    current choice: after a `select` that emit has not yet followed, shards/ and the manifest
    still hold the earlier one, and the summary says so."""
    folder = OutputFolder(url, storage_options)
    manifest = folder.read_json(folder.manifest)
    done = folder.is_complete()
    chosen = SelectionFile(folder) if folder.exists(folder.selection) else None
    selection = chosen.params if chosen is not None else manifest.get("selection")
    stale = chosen is not None and _request(chosen.params) != _request(manifest.get("selection"))
    t = manifest["totals"]
    kept = chosen.kept if chosen is not None else t["kept"]
    state = "complete (_SUCCESS)" if done else "INCOMPLETE (no _SUCCESS)"
    if stale:
        state = ("INCOMPLETE (selection.parquet was chosen after the last emit: shards/ and "
                 "manifest.json hold the earlier selection; run `sage-stream emit`)")  # fmt: skip
    lines = [
        f"output {url}: {state}",
        f"  seen {t['seen']}  scored {t['scored']}  errored {t['errored']}  kept {kept}  "
        f"dropped {t['scored'] - kept}",
        f"  selection: {json.dumps(_request(selection), sort_keys=True)}",
        *(f"  warning: {w}" for w in (selection or {}).get("warnings", [])),
    ]
    rows = chosen.rows if chosen is not None else {}
    for shard in manifest["inputs"]:
        now = rows.get(shard["name"], 0) if chosen is not None else shard["kept"]
        lines.append(
            f"  {shard['name']}: seen {shard['seen']} kept {now} errored {shard['errored']}"
            + (f" (shards/ holds {shard['kept']})" if now != shard["kept"] else "")
            + (f"  SHARD ERROR: {shard['shard_error']}" if shard["shard_error"] else "")
        )
    return "\n".join(lines + _decision_lines(folder) + _stop_lines(folder))


MAX_CLASS_LINES = 20


def _decision_lines(folder: OutputFolder) -> list[str]:
    """The mix of decisions per class (decisions.parquet's summary), for a folder with a
    selection."""
    if not folder.exists(folder.selection):
        return []
    summary = decisions_file.read_summary(folder)
    if summary is None:
        return ["  decisions: none recorded for this selection (made by an earlier version): "
                "rerun `sage-stream select`"]  # fmt: skip
    classes = summary["classes"]
    mix = decisions_file.mix(summary["totals"])
    lines = [f"  decisions (decisions.parquet, `inspect OUT --key KEY` for one): {mix}"]
    lines += [f"    {decisions_file.class_line(c)}" for c in classes[:MAX_CLASS_LINES]]
    if len(classes) > MAX_CLASS_LINES:
        lines.append(f"    ... and {len(classes) - MAX_CLASS_LINES} more classes")
    return lines


def _request(params: dict | None) -> dict:
    """The selection as asked for (its warnings are a finding, not part of the request)."""
    return {k: v for k, v in (params or {}).items() if k != "warnings"}


def _stop_lines(folder: OutputFolder) -> list[str]:
    """Why the last step stopped, if it failed or was stopped (outputs/stopped.py)."""
    stop = read_stop(folder)
    if stop is None:
        return []
    return [f"  STOPPED in {stop.get('step')}: {stop.get('error')}: {stop.get('message')}"]


def summarize(url: str, storage_options: dict | None = None) -> str:
    """A summary of whatever `url` is: a finished or partial run, a sketch, scores, a part."""
    storage_options = storage_options or {}
    if not exists(url, storage_options):
        raise InputError(f"nothing at {url}")
    if url.endswith(".parquet"):  # a file: never ask for entries under it
        return _parquet_summary(url, storage_options)
    if exists(join(url, "zarr.json"), storage_options):
        return _sketch_summary(url, storage_options)
    folder = OutputFolder(url, storage_options)
    if folder.exists(folder.manifest):
        return _output_summary(url, storage_options)
    if url.rstrip("/").endswith(SCORES):
        return _scores_summary(url, storage_options)
    if any(folder.exists(u) for u in (folder.sketch, folder.scores, folder.selection,
                                       folder.work("run.json"))):  # fmt: skip
        return _partial_summary(folder)
    raise InputError(f"{url} is not a sketch.zarr, a scores table or a sage-stream output")


def _parquet_summary(url: str, storage_options: dict) -> str:
    """A scores part, or a selection (no status column): what it holds."""
    table = read_table(url, storage_options=storage_options)
    if "status" in table.column_names:
        return _scores_summary(url, storage_options)
    labels = Counter(table["label"].to_pylist()) if "label" in table.column_names else {}
    return f"table {url}: {table.num_rows} rows; labels {dict(sorted(labels.items()))}"


def _partial_summary(folder: OutputFolder) -> str:
    """A run that stopped before emit (failed, killed, or run step by step): what is there,
    and, when recorded, which step stopped and why."""
    lines = [f"output {folder.url}: INCOMPLETE (no manifest: the run stopped before emit)"]
    identity = folder.stored_identity() or {}
    config = folder.recorded_config() or {}
    if identity:
        lines.append(
            f"  run: model {config.get('model')} (weights {str(identity.get('model'))[:12]}),"
            f" {len(identity.get('inputs', []))} input shard(s), "
            f"input_key {identity.get('input_key')}, label_key {identity.get('label_key')}"
        )
    finished = folder.finished_work()
    if folder.exists(folder.sketch):
        state = "complete" if SKETCH in finished else "not complete"
        lines.append(f"  sketch: {folder.sketch} ({state})")
    if folder.exists(folder.scores) and list_names(folder.scores, folder.storage_options):
        lines.append(_scores_summary(folder.scores, folder.storage_options))
    if folder.exists(folder.selection):
        lines.append(_parquet_summary(folder.selection, folder.storage_options))
        lines += _decision_lines(folder)
    if not finished:
        lines.append("  no pass finished: a rerun may change the configuration (no "
                     "--overwrite needed)")  # fmt: skip
    else:
        lines.append(f"  finished: {', '.join(finished)}; the same command resumes from there")
    if folder.exists(lease_url(folder)):
        lines.append(f"  being written, or left by a killed run: {lease_url(folder)} is there")
    return "\n".join(lines + _stop_lines(folder))
