"""`sage-stream inspect OUT --key KEY`: one sample's record, whether it was kept, and its class's
cut, read from what the run wrote.

Where it sits: after select (or emit), beside summary.py. It reads the scores parts one at a
time (only the rows of KEY are kept) and selection.parquet one shard's row group at a time, so
memory is that of one part, whatever the size of the run. A key may name samples in several
shards (keys are unique within a shard): each is shown.

The class's cut is the lowest ranking value (selection.parquet's `score`) among the kept
samples of the class: for `sage` the agreement itself, for the baselines the loss or gradient
norm as ranked, for `sage-coverage` the draw's key among the candidates that passed its filter.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow.compute as pc

from .errors import InputError
from .outputs.folder import OutputFolder
from .outputs.selection_file import SelectionFile
from .outputs.tables import read_part

ROW_ORDER = ("__shard__", "label", "status", "reason", "score", "coverage", "loss", "grad_norm",
             "energy")  # fmt: skip


def explain_key(folder: OutputFolder, key: str) -> str:
    """The lines `inspect --key` prints (see the module docstring)."""
    rows = list(_rows_of(folder, key))
    if not rows:
        raise InputError(f"no sample with key {key!r} in the scores of {folder.url}")
    chosen = SelectionFile(folder) if folder.exists(folder.selection) else None
    lines = [f"sample {key!r} in {folder.url}"]
    if chosen is not None:
        request = {k: v for k, v in chosen.params.items() if k != "warnings"}
        lines.append(f"  selection: {json.dumps(request, sort_keys=True)}")
    cuts = _class_cuts(chosen) if chosen is not None else {}
    for row in rows:
        lines += _describe(row, chosen, cuts)
    return "\n".join(lines)


def _rows_of(folder: OutputFolder, key: str):  # noqa: ANN202 - a generator of dicts
    for shard in folder.scored_shards():
        part, _ = read_part(folder, shard)
        found = part.filter(pc.equal(part["__key__"], key))
        yield from found.to_pylist()


def _describe(row: dict[str, Any], chosen: SelectionFile | None, cuts: dict) -> list[str]:
    shown = {k: row[k] for k in ROW_ORDER if k in row and row[k] is not None}
    lines = [f"  shard {row['__shard__']}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in
                                                      shown.items() if k != "__shard__")]  # fmt: skip
    if chosen is None:
        return [*lines, "  not selected yet: run `sage-stream select`"]
    if row.get("status") != "ok":
        return [*lines, "  dropped: an error row is never kept"]
    kept = chosen.read(row["__shard__"], ["__key__", "score"])
    mine = kept.filter(pc.equal(kept["__key__"], row["__key__"]))
    label = row.get("label")
    count, low = cuts.get(label, (0, math.nan))
    cut = f"class {label}: {count} kept, lowest kept ranking value {_fmt(low)}"
    if mine.num_rows:
        return [*lines, f"  KEPT, ranking value {_fmt(mine['score'][0].as_py())}; {cut}"]
    return [*lines, f"  dropped; {cut}"]


def _class_cuts(chosen: SelectionFile) -> dict[Any, tuple[int, float]]:
    """label -> (kept samples, lowest kept ranking value), one shard's rows at a time."""
    cuts: dict[Any, tuple[int, float]] = {}
    for shard in chosen.rows:
        table = chosen.read(shard, ["label", "score"])
        grouped = table.group_by("label").aggregate([("score", "min"), ("label", "count")])
        for item in grouped.to_pylist():
            count, low = cuts.get(item["label"], (0, math.inf))
            score = item["score_min"]
            cuts[item["label"]] = (count + item["label_count"],
                                   low if score is None else min(low, score))  # fmt: skip
    return cuts


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
