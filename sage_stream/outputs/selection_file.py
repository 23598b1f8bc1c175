"""OUT/selection.parquet: the kept samples, one row group per shard, read one shard at a time.

    columns      __key__, __shard__, label, score; rows sorted by shard then key
    row groups   one per shard with kept samples, in shard-name order
    metadata     sage_stream.selection        the selection's parameters (JSON)
                 sage_stream.selection_index  {shard: [row group, rows]} (JSON)

It is still one ordinary Parquet file: ``pyarrow.parquet.read_table("OUT/selection.parquet")``
reads it whole, as before. Inside sage-stream, emit, the feed, the manifest and the report go
through `SelectionFile`, which reads the footer once (O(shards)) and then only the row group of
the shard at hand, so nothing loads every kept key at once. A file without the index (written
by an earlier version) is read whole once, and then served the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InputError
from ..select.rules import OUTPUT_SCHEMA
from .folder import OutputFolder

SELECTION_KEY = b"sage_stream.selection"
INDEX_KEY = b"sage_stream.selection_index"


@dataclass
class WrittenSelection:
    url: str
    kept: int
    rows: dict[str, int]  # shard -> kept samples (shards with none are absent)


def write_selection_parts(
    folder: OutputFolder, parts: Iterable[tuple[str, pa.Table]], params: dict[str, Any]
) -> WrittenSelection:
    """Write selection.parquet from (shard, kept rows) in shard-name order, one row group each.

    Only one shard's rows are in memory at a time; the file appears whole or not at all.
    """
    schema = OUTPUT_SCHEMA.with_metadata({SELECTION_KEY: json.dumps(params, sort_keys=True)})
    index: dict[str, list[int]] = {}
    with folder.writer(folder.selection) as f:
        writer = pq.ParquetWriter(f, schema, write_statistics=False)
        try:
            for shard, table in parts:
                if table.num_rows:
                    writer.write_table(table.cast(schema), row_group_size=table.num_rows)
                    index[shard] = [len(index), table.num_rows]
            writer.add_key_value_metadata({INDEX_KEY: json.dumps(index, sort_keys=True)})
        finally:
            writer.close()
    rows = {shard: n for shard, (_, n) in index.items()}
    return WrittenSelection(folder.selection, sum(rows.values()), rows)


class SelectionFile:
    """A run's selection.parquet, read per shard (see the module)."""

    def __init__(self, folder: OutputFolder):
        self.folder, self.url = folder, folder.selection
        if not folder.exists(self.url):
            raise InputError(f"no selection at {self.url}: run `sage-stream select` first")
        with folder.open(self.url) as f:
            self._metadata = pq.ParquetFile(f).metadata
        meta = self._metadata.metadata or {}
        self.params: dict[str, Any] = json.loads(meta.get(SELECTION_KEY, b"{}"))
        self._legacy: dict[str, pa.Table] | None = None
        if INDEX_KEY in meta:
            found = json.loads(meta[INDEX_KEY])
            self._index = {shard: (int(g), int(n)) for shard, (g, n) in found.items()}
        else:  # no index: an earlier version's file, read whole once
            self._legacy = _split_by_shard(self._read_all())
            self._index = {s: (-1, t.num_rows) for s, t in self._legacy.items()}

    @property
    def rows(self) -> dict[str, int]:
        """shard -> kept samples, for every shard with at least one."""
        return {shard: n for shard, (_, n) in self._index.items()}

    @property
    def kept(self) -> int:
        return sum(n for _, n in self._index.values())

    def read(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        """The kept rows of one shard (sorted by key); empty if none of it was kept."""
        if shard not in self._index:
            return OUTPUT_SCHEMA.empty_table().select(columns or OUTPUT_SCHEMA.names)
        if self._legacy is not None:
            table = self._legacy[shard]
            return table.select(columns) if columns else table
        with self.folder.open(self.url) as f:
            part = pq.ParquetFile(f, metadata=self._metadata)
            # one shard's rows, on this thread (see decisions_file.rows_of)
            table = part.read_row_group(self._index[shard][0], columns=columns, use_threads=False)
        return table.replace_schema_metadata(None)

    def keys(self, shard: str) -> frozenset[str]:
        return frozenset(self.read(shard, ["__key__"])["__key__"].to_pylist())

    def _read_all(self) -> pa.Table:
        with self.folder.open(self.url) as f:  # not pq.read_table: see outputs/tables.read_table
            return pq.ParquetFile(f).read().replace_schema_metadata(None)


def _split_by_shard(table: pa.Table) -> dict[str, pa.Table]:
    shards = sorted(set(table["__shard__"].to_pylist()))
    return {s: table.filter(pc.equal(table["__shard__"], s)) for s in shards}


_OPEN: dict[tuple[str, str], SelectionFile] = {}


def selection_file(folder: OutputFolder, digest: str | None = None) -> SelectionFile:
    """A `SelectionFile`, kept open per process for a selection of known digest (emit jobs of
    one selection then parse the footer once per worker, not once per shard)."""
    if digest is None:
        return SelectionFile(folder)
    key = (folder.selection, digest)
    if key not in _OPEN:
        _OPEN.clear()  # one selection at a time is all a worker serves
        _OPEN[key] = SelectionFile(folder)
    return _OPEN[key]


__all__ = ["INDEX_KEY", "SELECTION_KEY", "SelectionFile", "selection_file",
           "write_selection_parts"]  # fmt: skip
