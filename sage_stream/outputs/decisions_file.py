"""OUT/decisions/ and OUT/decisions.json: why each sample was kept or not, written by select.

    decisions/part-<shard>.parquet   one row per row of scores/part-<shard>.parquet, same order
                                     (columns: select/decisions.DECISION_SCHEMA)
    decisions.json                   per class: rows, kept, cut, its decisions (and for
                                     sage-coverage its filter's numbers); totals

Where it sits: passes/select.py writes a part per shard in the same pass that writes
selection.parquet, then decisions.json last, so decisions.json is there only when every part
belongs to the selection beside it: a select that starts removes it first, and one that stops
part-way leaves none. inspect (explain.py, summary.py), the report and emit's completeness
check (folder.check_outputs) read them; readers of a folder without decisions.json say that
the selection recorded none (made by an earlier version, or stopped).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..select.coverage import FILTER_COLUMNS
from ..select.decisions import DECISIONS
from .folder import PART_PREFIX, PART_SUFFIX, OutputFolder


def start(folder: OutputFolder, shards: list[str]) -> None:
    """Before the first part is written: no summary (the parts are about to change), and no
    part of a shard this selection does not cover."""
    if folder.exists(folder.decisions_summary):
        folder.remove(folder.decisions_summary)
    if not folder.exists(folder.decisions):
        return
    wanted = {f"{PART_PREFIX}{s}{PART_SUFFIX}" for s in shards}
    for name in folder.names(folder.decisions):
        if name not in wanted:
            folder.remove(folder.path(folder.decisions, name))


def write_part(folder: OutputFolder, shard: str, table: pa.Table) -> None:
    """One shard's part, atomically but not yet durably: `finish` syncs them all at once (an
    fsync per part and folder was most of a 5,000-shard select's time)."""
    with folder.writer(folder.decision_part(shard), durable=False) as f:
        pq.write_table(table, f)


def finish(folder: OutputFolder, summary: dict[str, Any]) -> None:
    """decisions.json, once every part is written, durable, and the selection beside them."""
    if folder.exists(folder.decisions):
        folder.make_durable(folder.decisions)
    folder.write_json(folder.decisions_summary, summary)


def read_summary(folder: OutputFolder) -> dict[str, Any] | None:
    """decisions.json, or None where the selection recorded no decisions."""
    return folder.read_json(folder.decisions_summary)


def class_line(c: dict[str, Any]) -> str:
    """One class of decisions.json in a line: kept, cut, the filter's numbers, the mix."""
    line = f"class {c['label']}: {c['kept']} of {c['rows']} kept, cut {_fmt(c['cut'])}"
    for name in FILTER_COLUMNS:  # sage-coverage's filter
        if name in c:
            line += f", {name.replace('_', ' ')} {_fmt(c[name])}"
    return f"{line}; {mix(c['decisions'])}"


def mix(counts: dict[str, int]) -> str:
    """'21 kept, 11 below_cut, ...' in the order of select/decisions.DECISIONS."""
    return ", ".join(f"{counts[d]} {d}" for d in DECISIONS if d in counts)


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def rows_of(folder: OutputFolder, shard: str, key: str) -> list[dict[str, Any]]:
    """The decision rows of `key` in one shard (one at most: keys are unique in a shard)."""
    with folder.open(folder.decision_part(shard)) as f:
        table = pq.read_table(f)
    return table.filter(pc.equal(table["__key__"], key)).to_pylist()
