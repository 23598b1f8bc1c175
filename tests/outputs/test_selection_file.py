"""selection.parquet: one row group per shard, an index, read per shard; still plain Parquet."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sage_stream.errors import InputError
from sage_stream.outputs.folder import OutputFolder
from sage_stream.outputs.selection_file import (
    SELECTION_KEY,
    SelectionFile,
    selection_file,
    write_selection_parts,
)
from sage_stream.select.rules import OUTPUT_SCHEMA


def kept(shard: str, keys: list[str]) -> pa.Table:
    n = len(keys)
    return pa.table({"__key__": keys, "__shard__": [shard] * n, "label": list(range(n)),
                     "score": [0.5] * n}, schema=OUTPUT_SCHEMA)  # fmt: skip


def test_one_row_group_per_shard_read_alone(mem_url):
    folder = OutputFolder(mem_url)
    parts = [("a.tar", kept("a.tar", ["k1", "k2"])), ("b.tar", kept("b.tar", [])),
             ("c.tar", kept("c.tar", ["k0"]))]  # fmt: skip
    written = write_selection_parts(folder, iter(parts), {"keep": 0.5})
    assert written.kept == 3 and written.rows == {"a.tar": 2, "c.tar": 1}
    sel = SelectionFile(folder)
    assert sel.params == {"keep": 0.5} and sel.rows == {"a.tar": 2, "c.tar": 1} and sel.kept == 3
    assert sel.read("c.tar").equals(kept("c.tar", ["k0"]))
    assert sel.keys("a.tar") == {"k1", "k2"} and sel.keys("b.tar") == frozenset()
    assert sel.read("zzz", ["__key__"]).num_rows == 0
    with folder.open(folder.selection) as f:
        data = f.read()
    assert pq.ParquetFile(io.BytesIO(data)).num_row_groups == 2
    whole = pq.read_table(io.BytesIO(data))  # a plain Parquet reader sees every kept row
    assert whole["__key__"].to_pylist() == ["k1", "k2", "k0"]
    assert selection_file(folder, "d1") is selection_file(folder, "d1")


def test_a_file_without_index_is_still_read(mem_url):
    folder = OutputFolder(mem_url)
    table = pa.concat_tables([kept("a.tar", ["k1"]), kept("b.tar", ["k2", "k3"])])
    table = table.replace_schema_metadata({SELECTION_KEY: b'{"keep": 0.3}'})
    folder.write_bytes(folder.selection, _parquet(table))
    sel = SelectionFile(folder)
    assert sel.params == {"keep": 0.3} and sel.rows == {"a.tar": 1, "b.tar": 2}
    assert sel.keys("b.tar") == {"k2", "k3"}


def test_missing_selection_says_which_step(mem_url):
    with pytest.raises(InputError, match="run `sage-stream select` first"):
        SelectionFile(OutputFolder(mem_url))


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
