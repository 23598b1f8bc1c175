"""The run's tables under OUT: scores/part-<shard>.parquet and selection.parquet.

A scores part is written whole under a temporary name and moved into place, so a part that
exists is complete. A shard whose stream broke part-way still gets its part (the rows before
the break) and the reason in the part's metadata, which the manifest reports.
"""

import json
import math
import os
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InputError
from ..storage import normalize_url, open_input
from ..storage.retry import call
from .folder import OutputFolder

SCORE_SCHEMA = pa.schema(
    [
        ("__key__", pa.string()),
        ("__shard__", pa.string()),
        ("label", pa.int64()),
        ("score", pa.float64()),
        ("loss", pa.float64()),
        ("grad_norm", pa.float64()),
        ("energy", pa.float64()),
        ("coverage", pa.float64()),  # ridge leverage τ from the sketch (sage_stream.coverage)
        ("status", pa.string()),
        ("reason", pa.string()),
        ("margin", pa.float64()),  # label logit − largest other (sage_stream.signature)
        (
            "signature",
            pa.list_(pa.field("element", pa.float32()), 32),
        ),  # near-copy signature (sage_stream.signature)
        # 64-bit digest of the decoded input and label (batches.content_digest): the same for
        # the same sample in any shard, format or key; null where the sample did not decode
        ("digest", pa.int64()),
    ]
)
SCORE_COLUMNS = tuple(SCORE_SCHEMA.names)
OPTIONAL_COLUMNS = ("margin", "signature")  # for selection; null where pass 2 has no such value
SHARD_ERROR_KEY = b"sage_stream.shard_error"
SELECTION_KEY = b"sage_stream.selection"
# What an emitted sample carries about itself (`<key>.sage.json`, `sage_*` columns).
ANNOTATION_COLUMNS = ("label", "score", "loss", "grad_norm", "energy")


def errored_count(table: pa.Table) -> int:
    """Rows of a scores table with status "error" (the rest are scored)."""
    if table.num_rows == 0:
        return 0
    return int(pc.sum(pc.equal(table["status"], "error")).as_py() or 0)


def _write_table(folder: OutputFolder, url: str, table: pa.Table) -> None:
    with folder.writer(url) as f:
        pq.write_table(table, f)


def write_part(folder: OutputFolder, shard: str, table: pa.Table, shard_error: str | None) -> None:
    metadata = {SHARD_ERROR_KEY: (shard_error or "").encode()}
    for name in OPTIONAL_COLUMNS:  # a part made without them (a test's table): all null
        if name not in table.column_names:
            field = SCORE_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    table = table.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)
    _write_table(folder, folder.part(shard), table.replace_schema_metadata(metadata))


THREADED_ROWS = 2**16  # a Parquet file of fewer rows is decoded on the calling thread


def read_table(
    url: str, columns: list[str] | None = None, storage_options=None, optional: tuple = ()
) -> pa.Table:
    """A Parquet file at any URL, read through the retried storage helpers; the `optional`
    columns too where the file has them (scores parts written before a column existed).

    Read with `ParquetFile`, never `pq.read_table` on the open file: that goes through
    pyarrow.dataset, whose threads reading a Python file object could still run at interpreter
    exit and abort the process ("terminate called without an active exception", exit 134; a
    third of `sage-stream inspect OUT/scores` runs with pyarrow 26). A local path is opened
    by pyarrow itself, the whole read retried on a transient error (a FUSE mount's): fsspec's
    lookup and the retried Python file cost most of a small part's read."""
    path = normalize_url(url)
    if "://" in path or "::" in path:  # fsspec reads every other spelling as a local path
        with open_input(url, storage_options) as f:
            return _read_parquet(f, url, columns, optional)
    path = os.path.expanduser(path)  # ~ as fsspec reads it

    def read() -> pa.Table:
        with pa.OSFile(path, "rb") as f:
            return _read_parquet(f, url, columns, optional)

    return call(read, what=f"read {url}")


def _read_parquet(f: Any, url: str, columns: list[str] | None, optional: tuple) -> pa.Table:
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    missing = [c for c in columns or () if c not in names]
    if missing:  # ParquetFile.read would leave them out silently
        raise KeyError(f"{url} has no column(s) {', '.join(missing)}")
    wanted = list(columns) if columns is not None else names
    wanted += [c for c in optional if c in names and c not in wanted]
    # pyarrow's thread pool costs more than it saves on a small file (most parts)
    return pf.read(columns=wanted, use_threads=pf.metadata.num_rows >= THREADED_ROWS)


def read_part(
    folder: OutputFolder, shard: str, columns: list[str] | None = None, optional: tuple = ()
) -> tuple[pa.Table, str | None]:
    """One shard's scores and its shard-level error (None if its stream was whole)."""
    url = folder.part(shard)
    try:  # no exists() first: a lookup per part, most of a small part's read
        table = read_table(url, columns, folder.storage_options, optional)
    except FileNotFoundError:
        msg = f"no scores for shard {shard!r} at {url}: run `sage-stream score` first"
        raise InputError(msg) from None
    error = (table.schema.metadata or {}).get(SHARD_ERROR_KEY, b"").decode() or None
    return table.replace_schema_metadata(None), error


def read_scores(
    folder: OutputFolder, shards: Iterable[str], columns: list[str] | None = None
) -> pa.Table:
    """The scores of the given shards, concatenated in shard order."""
    tables = [read_part(folder, s, columns)[0] for s in shards]
    if not tables:
        return SCORE_SCHEMA.empty_table().select(columns or list(SCORE_COLUMNS))
    return pa.concat_tables(tables)


def write_selection(folder: OutputFolder, table: pa.Table, params: dict) -> str:
    """selection.parquet from a whole kept table (sorted by shard then key), in the per-shard
    layout of outputs.selection_file; `select` itself writes shard by shard."""
    from .selection_file import write_selection_parts

    shards = sorted(set(table["__shard__"].to_pylist()))
    parts = ((s, table.filter(pc.equal(table["__shard__"], s))) for s in shards)
    return write_selection_parts(folder, parts, params).url


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def annotations(
    part: pa.Table, kept_keys: set[str] | frozenset[str], scorer: str
) -> dict[str, dict[str, Any]]:
    """Per kept key, what the output carries about it: scores of the run and the scorer used."""
    rows = part.select(["__key__", "status", *ANNOTATION_COLUMNS]).to_pylist()
    return {
        row["__key__"]: {
            **{c: _finite_or_none(row[c]) for c in ANNOTATION_COLUMNS},
            "scorer": scorer,
        }
        for row in rows
        if row["__key__"] in kept_keys and row["status"] == "ok"  # a duplicate's error row too
    }


def kept_by_shard(selection: pa.Table) -> dict[str, set[str]]:
    """shard -> the kept keys of that shard, from a selection table (one pass over it)."""
    kept: dict[str, set[str]] = {}
    for shard, key in zip(
        selection["__shard__"].to_pylist(), selection["__key__"].to_pylist(), strict=True
    ):
        kept.setdefault(shard, set()).add(key)
    return kept


def read_selection(folder: OutputFolder) -> tuple[pa.Table, dict]:
    url = folder.selection
    if not folder.exists(url):
        raise InputError(f"no selection at {url}: run `sage-stream select` first")
    table = read_table(url, storage_options=folder.storage_options)
    params = json.loads((table.schema.metadata or {}).get(SELECTION_KEY, b"{}"))
    return table.replace_schema_metadata(None), params


__all__ = [
    "ANNOTATION_COLUMNS",
    "SCORE_COLUMNS",
    "annotations",
    "SCORE_SCHEMA",
    "errored_count",
    "kept_by_shard",
    "read_part",
    "read_scores",
    "read_selection",
    "read_table",
    "write_part",
    "write_selection",
]
