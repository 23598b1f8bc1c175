"""OUT/decisions.parquet: why each sample was kept or not, written by select, read per shard.

    columns      select/decisions.DECISION_SCHEMA: one row per scores row, in the scores
                 part's order
    row groups   one per shard with scores rows, in shard-name order
    metadata     sage_stream.decisions        per class: rows, kept, cut, the filter's
                                              numbers, the count of each decision; totals (JSON)
                 sage_stream.decisions_index  {shard: [row group, rows]} (JSON)

Where it sits: passes/select.py writes it in the pass that writes selection.parquet, one shard's
rows at a time (`writing`), and commits it after the selection: one file that appears whole or
not at all, so it always belongs to the selection beside it (a select removes the earlier one
before it changes anything, and one that stops leaves none). One file rather than one per shard:
a write per shard (an fsync, or an object upload) would double the time of a select over many
small shards. inspect (explain.py, summary.py), the report, the manifest and emit's
completeness check (`check`) read the footer once and then only the row group they need; a
folder without the file has a selection that recorded no decisions (an earlier version's).
It is still one plain Parquet file: ``pyarrow.parquet.read_table`` reads it whole.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import StorageError
from ..select.coverage import FILTER_COLUMNS
from ..select.decisions import DECISION_SCHEMA, DECISIONS, DICTIONARY_COLUMNS
from .folder import OutputFolder

SUMMARY_KEY = b"sage_stream.decisions"
INDEX_KEY = b"sage_stream.decisions_index"


@dataclass
class DecisionSink:
    """The open decisions.parquet of one select: `write` each shard's rows, in shard order,
    and set `summary` before the block that opened it ends."""

    writer: pq.ParquetWriter
    index: dict[str, list[int]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    groups: int = 0

    def write(self, shard: str, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table, row_group_size=table.num_rows)
            self.index[shard] = [self.groups, table.num_rows]
            self.groups += 1
        else:
            self.index[shard] = [-1, 0]


@contextlib.contextmanager
def writing(folder: OutputFolder) -> Iterator[DecisionSink]:
    """decisions.parquet, committed when the block ends without error; the earlier one is
    removed first, so none is there while (or if) this one is not complete."""
    if folder.exists(folder.decisions):
        folder.remove(folder.decisions)
    with folder.writer(folder.decisions) as f:
        writer = pq.ParquetWriter(f, DECISION_SCHEMA, write_statistics=False,
                                  use_dictionary=DICTIONARY_COLUMNS)  # fmt: skip
        sink = DecisionSink(writer)
        try:
            yield sink
            sink.writer.add_key_value_metadata({
                INDEX_KEY: json.dumps(sink.index, sort_keys=True),
                SUMMARY_KEY: json.dumps(sink.summary, sort_keys=True),
            })  # fmt: skip
        finally:
            sink.writer.close()


def _footer(folder: OutputFolder) -> tuple[Any, dict[bytes, bytes]] | None:
    if not folder.exists(folder.decisions):
        return None
    with folder.open(folder.decisions) as f:
        metadata = pq.ParquetFile(f).metadata
    return metadata, metadata.metadata or {}


def read_summary(folder: OutputFolder) -> dict[str, Any] | None:
    """The per-class summary, or None where the selection recorded no decisions."""
    found = _footer(folder)
    return None if found is None else json.loads(found[1].get(SUMMARY_KEY, b"null"))


def shard_rows(folder: OutputFolder) -> dict[str, int] | None:
    """shard -> its rows in decisions.parquet, or None where there is no such file."""
    found = _footer(folder)
    if found is None:
        return None
    return {s: int(n) for s, (_, n) in json.loads(found[1].get(INDEX_KEY, b"{}")).items()}


def rows_of(folder: OutputFolder, shard: str, key: str) -> list[dict[str, Any]]:
    """The decision rows of `key` in one shard (one at most: keys are unique in a shard)."""
    found = _footer(folder)
    if found is None:
        return []
    group, _ = json.loads(found[1].get(INDEX_KEY, b"{}")).get(shard, [-1, 0])
    if group < 0:
        return []
    with folder.open(folder.decisions) as f:
        # one shard's rows, on this thread: pyarrow's pool reading a Python file object could
        # still run at interpreter exit and abort `inspect --key` (see tables.read_table)
        table = pq.ParquetFile(f, metadata=found[0]).read_row_group(group, use_threads=False)
    return table.filter(pc.equal(table["__key__"], key)).to_pylist()


def check(folder: OutputFolder, shards: list[dict[str, Any]]) -> None:
    """Before _SUCCESS, where the selection recorded decisions: one per scores row of every
    listed shard (the manifest's entries: ``name``, ``seen``)."""
    rows = shard_rows(folder)
    if rows is None:
        return
    wrong = [f"{s['name']}: {rows.get(s['name'], 0)} of {s['seen']}" for s in shards
             if s.get("seen") is not None and rows.get(s["name"], 0) != s["seen"]]  # fmt: skip
    if wrong:
        raise StorageError(
            f"{folder.decisions} does not hold a decision for every scores row, not committing "
            f"({len(wrong)} shard(s): " + "; ".join(wrong[:5]) + "): rerun `sage-stream select`"
        )


def class_line(c: dict[str, Any]) -> str:
    """One class of the summary in a line: kept, cut, the filter's numbers, the mix."""
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
