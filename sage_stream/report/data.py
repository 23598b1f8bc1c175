"""What the report is computed from: a finished run's tables, read back from storage.

The report comes after EMIT in the flow and never runs a model: everything it shows is read
from what the run wrote (``manifest.json``, ``scores/``, ``selection.parquet`` and the singular
values in ``sketch.zarr``), through fsspec, so a run on ``memory://`` or ``s3://`` reports the
same way as one on disk. Only the columns the figures need are read; the sketch's basis (ℓ×D,
possibly large) is never loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from ..outputs.folder import OutputFolder
from ..outputs.selection_file import SelectionFile
from ..outputs.tables import read_part

COLUMNS = ["__key__", "__shard__", "label", "score", "energy", "status"]
NO_LABEL = -1  # label shown for a sample whose label is null


@dataclass
class RunData:
    """Every sample of the run, one entry per row of scores/ (N rows, shard order)."""

    out: str
    manifest: dict[str, Any]
    selection: dict[str, Any]  # the selection's parameters (keep, balance, scorer, ...)
    keys: np.ndarray  # (N,) object: sample keys
    shards: np.ndarray  # (N,) object: shard names
    labels: np.ndarray  # (N,) int64, NO_LABEL where null
    scores: np.ndarray  # (N,) float64, NaN where no score
    energy: np.ndarray  # (N,) float64, NaN where not recorded
    ok: np.ndarray  # (N,) bool: status "ok" (scored)
    kept: np.ndarray  # (N,) bool: in selection.parquet
    shard_index: np.ndarray  # (N,) int64: position of the sample's shard in shard_names
    shard_names: list[str]  # shards in scores/ order
    shard_errors: dict[str, str]  # shard -> why its stream broke
    sigma: np.ndarray | None  # (ℓ,) float64 singular values, None without a sketch
    sketch_stats: dict[str, Any] | None  # n, frobenius_sq, delta, captured, ...


def read_manifest(folder: OutputFolder) -> dict[str, Any]:
    url = folder.manifest
    if not folder.exists(url):
        raise InputError(
            f"no manifest at {url}: `sage-stream report` needs a finished run "
            "(run `sage-stream run`, or `emit` after `select`)"
        )
    try:
        return folder.read_json(url)
    except json.JSONDecodeError as exc:
        raise InputError(f"{url} is not valid JSON: {exc}") from None


def _partial_manifest(status: np.ndarray, kept: list[np.ndarray], selected: bool) -> dict:
    n_kept = int(sum(k.sum() for k in kept))
    scored = int((status == "ok").sum())
    totals = {"seen": len(status), "scored": scored, "errored": len(status) - scored,
              "kept": n_kept if selected else None, "dropped": scored - n_kept if selected else None}  # fmt: skip
    step = "emit" if selected else "select and emit"
    note = f"this run did not finish (no manifest.json): figures from scores/ only; {step} not run"
    return {"totals": totals, "warnings": [note]}


def _column(tables: list[pa.Table], name: str, null: float | str, dtype: type) -> np.ndarray:
    if not tables:
        return np.zeros(0, dtype=dtype)
    column = pa.concat_arrays([t[name].combine_chunks() for t in tables])
    return np.asarray(pc.fill_null(column, null).to_numpy(zero_copy_only=False), dtype=dtype)


def load_run(out: str, storage_options: dict | None = None) -> RunData:
    """Read what the report needs from a run's output; InputError naming what is missing."""
    folder = OutputFolder(out, storage_options or {})
    names = folder.scored_shards() if folder.exists(folder.scores) else []
    finished = folder.exists(folder.manifest)
    if not finished and not names:
        read_manifest(folder)  # nothing to report on: its error says what to run
    manifest = read_manifest(folder) if finished else {}
    selection = SelectionFile(folder) if folder.exists(folder.selection) else None
    params = selection.params if selection is not None else {}
    parts, kept, index, errors = [], [], [], {}
    none = pa.array([], pa.string())
    for i, name in enumerate(names):
        part, error = read_part(folder, name, COLUMNS)
        parts.append(part)
        chosen = selection is not None and name in selection.rows
        keys = selection.read(name, ["__key__"])["__key__"] if chosen else none  # type: ignore[union-attr]
        in_selection = pc.is_in(part["__key__"], value_set=pa.chunked_array([keys]).combine_chunks()
                                if isinstance(keys, pa.ChunkedArray) else keys)  # fmt: skip
        kept.append(np.asarray(in_selection.to_numpy(zero_copy_only=False), dtype=bool))
        index.append(np.full(part.num_rows, i, dtype=np.int64))
        if error:
            errors[name] = error
    status = _column(parts, "status", "", object)
    if not finished:  # a failed or partial run: what its scores and selection say
        manifest = _partial_manifest(status, kept, selection is not None)
    sketch = manifest.get("sketch") or None
    return RunData(
        out=out,
        manifest=manifest,
        selection=params,
        keys=_column(parts, "__key__", "", object),
        shards=_column(parts, "__shard__", "", object),
        labels=_column(parts, "label", NO_LABEL, np.int64),
        scores=_column(parts, "score", float("nan"), np.float64),
        energy=_column(parts, "energy", float("nan"), np.float64),
        ok=status == "ok",
        kept=np.concatenate(kept) if kept else np.zeros(0, dtype=bool),
        shard_index=np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
        shard_names=names,
        shard_errors=errors,
        # A baseline run leaves no sketch stats; a sketch.zarr there is from an earlier run.
        sigma=folder.sketch_store().singular_values() if sketch else None,
        sketch_stats=sketch,
    )


def extremes(run: RunData, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the `top` most and least agreeing scored samples (ties broken by key)."""
    candidates = np.flatnonzero(run.ok & np.isfinite(run.scores))
    if top == 0 or candidates.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    keys = run.keys[candidates].astype(str)
    scores = run.scores[candidates]
    ascending = candidates[np.lexsort((keys, scores))]  # by score, then key
    descending = candidates[np.lexsort((keys, -scores))]
    return descending[:top], ascending[:top]


def shard_table(run: RunData) -> list[dict[str, Any]]:
    """Per shard: seen, scored, errored, kept, keep rate (of scored) and its stream error."""
    size = len(run.shard_names)
    seen = np.bincount(run.shard_index, minlength=size)  # (S,)
    scored = np.bincount(run.shard_index, weights=run.ok, minlength=size).astype(np.int64)
    kept = np.bincount(run.shard_index, weights=run.kept, minlength=size).astype(np.int64)
    return [
        {
            "name": name,
            "seen": int(seen[i]),
            "scored": int(scored[i]),
            "errored": int(seen[i] - scored[i]),
            "kept": int(kept[i]),
            "keep_rate": kept[i] / scored[i] if scored[i] else float("nan"),
            "shard_error": run.shard_errors.get(name),
        }
        for i, name in enumerate(run.shard_names)
    ]


def class_table(run: RunData) -> list[dict[str, Any]]:
    """Per class (label) of the scored samples: scored, kept, dropped, keep rate, medians."""
    labels, scores, kept = run.labels[run.ok], run.scores[run.ok], run.kept[run.ok]
    classes, inverse = np.unique(labels, return_inverse=True)  # (C,), (n_ok,)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(classes) + 1))
    rows = []
    for c, label in enumerate(classes.tolist()):
        members = order[bounds[c] : bounds[c + 1]]  # rows of class c
        k = kept[members]
        rows.append(
            {
                "label": label,
                "scored": int(members.size),
                "kept": int(k.sum()),
                "dropped": int((~k).sum()),
                "keep_rate": float(k.mean()),
                "median_kept": _median(scores[members][k]),
                "median_dropped": _median(scores[members][~k]),
            }
        )
    return rows


def _median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")
