"""`sage-stream inspect OUT --key KEY`: one sample's record, whether it was kept and why not,
and its class's cut, read from what the run wrote.

Where it sits: after select (or emit), beside summary.py. It reads the scores parts one at a
time, keeping only the rows of KEY, and of decisions.parquet (outputs/decisions_file.py) the
footer (its class's summary) and the row group of each shard holding KEY, so memory is that of
one part, whatever the size of the run. A key may name samples in several shards (keys are
unique within a shard): each is shown.

A selection made before decisions were recorded has no decisions.parquet: then only kept or
not is shown, from selection.parquet.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.compute as pc

from .errors import InputError
from .outputs import decisions_file
from .outputs.folder import OutputFolder
from .outputs.selection_file import SelectionFile
from .outputs.tables import read_part
from .select.coverage import SET_ASIDE

ROW_ORDER = ("__shard__", "label", "status", "reason", "score", "coverage", "loss", "grad_norm",
             "energy")  # fmt: skip
NO_DECISIONS = ("this selection recorded no decisions (made by an earlier version): rerun "
                "`sage-stream select` to see why")  # fmt: skip


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
    summary = decisions_file.read_summary(folder) if chosen is not None else None
    classes = {c["label"]: c for c in (summary or {}).get("classes", [])}
    for row in rows:
        shown = {k: row[k] for k in ROW_ORDER if k in row and row[k] is not None}
        lines.append(f"  shard {row['__shard__']}: " + "  ".join(
            f"{k} {_fmt(v)}" for k, v in shown.items() if k != "__shard__"))  # fmt: skip
        if chosen is None:
            lines.append("  not selected yet: run `sage-stream select`")
        elif summary is None:
            kept = key in chosen.keys(row["__shard__"])
            lines += [f"  {'KEPT' if kept else 'dropped'}", f"  {NO_DECISIONS}"]
        else:
            for decided in decisions_file.rows_of(folder, row["__shard__"], key):
                lines += [f"  {_why(decided, row)}", *_class_line(classes.get(decided["label"]))]
    return "\n".join(lines)


def _rows_of(folder: OutputFolder, key: str):  # noqa: ANN202 - a generator of dicts
    for shard in folder.scored_shards():
        part, _ = read_part(folder, shard)
        found = part.filter(pc.equal(part["__key__"], key))
        yield from found.to_pylist()


def _why(d: dict[str, Any], row: dict[str, Any]) -> str:
    """The decision in words, with the numbers that made it (select/decisions.py)."""
    value, cut, what = _fmt(d["value"]), _fmt(d["cut"]), d["decision"]
    if what == "kept":
        of = d["duplicate_of_key"]
        copy = f" (a near-copy of {of!r}, kept too)" if of else ""
        return f"KEPT: ranking value {value}, its class's cut {cut}{copy}"
    if what == "error":
        return f"dropped (error): never a candidate ({row.get('reason') or 'no reason recorded'})"
    if what == "duplicate":
        return (f"dropped (duplicate): a near-copy of {d['duplicate_of_key']!r} in shard "
                f"{d['duplicate_of_shard']}, ranked after its class's other samples (--dedup on)")  # fmt: skip
    if what in SET_ASIDE:
        try:
            said = SET_ASIDE[what].format(**{**row, **d})
        except (KeyError, TypeError, ValueError):  # a number it names is missing: say less
            said = what
        return f"dropped ({what}): set aside by sage-coverage's filter: {said}"
    if what == "min_score":
        return f"dropped (min_score): ranking value {value} below --min-score {cut}"
    if d["cut"] is None:
        return f"dropped (below_cut): ranking value {value}; its class keeps none"
    return (f"dropped (below_cut): ranking value {value} ranks after its class's cut {cut} "
            "(ties go by key, then shard)")  # fmt: skip


def _class_line(c: dict[str, Any] | None) -> list[str]:
    return [] if c is None else [f"  {decisions_file.class_line(c)}"]


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
