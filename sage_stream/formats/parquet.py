"""Parquet shards: the reader at the start of the flow and the copier used by emit.

``read_parquet`` streams record batches (never the whole table: ``pre_buffer=False``, which
pyarrow would otherwise turn into one read of every row group) and turns each row into a
``Sample`` whose fields are the row's columns as Python values. The key is the key column
(``__key__`` by default) as text, or, without one, the row index as ``f"{index:09d}"``, so that
scores, the selection and the emitted rows refer to the same rows on every run.

``copy_selected_parquet`` re-reads a shard for emit and writes the kept rows with every
original column and type unchanged, plus ``sage_*`` columns holding each row's score. Both open
the shard through ``storage.open_shard`` (bounded reads, resumed after transient errors).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from sage_stream.errors import ShardError
from sage_stream.sample import Sample, ShardRef
from sage_stream.storage.fs import open_shard
from sage_stream.storage.retry import RetryingReader

# Types of the columns emit adds; other names get the type of their first non-null value.
SAGE_TYPES: dict[str, pa.DataType] = {
    "score": pa.float64(),
    "label": pa.int64(),
    "loss": pa.float64(),
    "grad_norm": pa.float64(),
    "energy": pa.float64(),
    "scorer": pa.string(),
}
# Flush kept rows as one row group at whichever limit comes first: large row groups read
# fast, and the byte limit bounds memory when rows hold images.
_ROW_GROUP_ROWS = 65536
_ROW_GROUP_BYTES = 64 * 2**20


def _open(ref: ShardRef, f: RetryingReader) -> pq.ParquetFile:
    try:
        # pre_buffer would read every row group at once; stream them one by one instead
        return pq.ParquetFile(f, pre_buffer=False)
    except ShardError:
        raise  # the stream itself failed (see storage.open_shard): already names the shard
    except (pa.ArrowException, OSError) as e:
        raise ShardError(ref.url, f"not a readable Parquet file: {_one_line(e)}") from e


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _row_keys(
    batch: pa.RecordBatch, key_column: str | None, start: int, seen: set[str]
) -> tuple[list[str], list[str | None]]:
    """Keys and reader errors of a batch's rows; ``seen`` carries keys across batches."""
    values = batch.column(key_column).to_pylist() if key_column else [None] * batch.num_rows
    keys: list[str] = []
    errors: list[str | None] = []
    for offset, value in enumerate(values):
        index = start + offset
        error: str | None
        if key_column and value is None:
            key, error = f"{index:09d}", f"null key in column {key_column!r}"
        else:
            key = f"{index:09d}" if not key_column else _key_text(value)
            error = "duplicate key in shard" if key in seen else None
        seen.add(key)
        keys.append(key)
        errors.append(error)
    return keys, errors


def _key_text(value: object) -> str:
    """A binary key as text: bytes that are not UTF-8 become ``\\xff`` escapes, so two keys
    that differ in such bytes stay two keys ("replace" made both U+FFFD: false
    duplicates)."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _keyed_batches(
    ref: ShardRef,
    pf: pq.ParquetFile,
    key_column: str,
    batch_rows: int,
    columns: list[str] | None,
) -> Iterator[tuple[pa.RecordBatch | None, list[str], list[str | None]]]:
    """``(batch, keys, errors)`` in file order, one row group at a time.

    A row group whose data cannot be decoded does not end the shard: its rows not yet given
    come out as ``(None, keys, errors)``, every row an error naming the row group, and the
    next row group is read. The footer's row count says how many rows that is; the keys are
    read from the key column alone when that still decodes, else they are row numbers.
    ShardError if the stream itself breaks (storage.open_shard) or the shard changed.
    """
    names = pf.schema_arrow.names
    key_col = key_column if key_column in names else None
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise ShardError(ref.url, f"no column(s) {missing}; its columns are {names}")
        columns = columns + [key_col] if key_col and key_col not in columns else columns
    seen: set[str] = set()
    start = 0
    last_key: str | None = None
    for group in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        done = 0
        # use_threads=False: a read error inside pyarrow's thread pool can abort the
        # interpreter at exit (pyarrow 26); one shard's decoding is never a pass's bottleneck.
        batches = pf.iter_batches(
            batch_size=batch_rows, row_groups=[group], columns=columns, use_threads=False
        )
        try:
            for batch in batches:
                keys, errors = _row_keys(batch, key_col, start + done, seen)
                yield batch, keys, errors
                done += batch.num_rows
                last_key = keys[-1] if keys else last_key
        except ShardError as e:
            raise ShardError(e.url, e.reason, key=e.key or last_key) from e
        except (pa.ArrowException, OSError) as e:
            reason = f"unreadable Parquet data in row group {group}: {_one_line(e)}"
            keys = _group_keys(pf, group, key_col, start, rows)[done:]
            failed: list[str | None] = []
            for key in keys:
                failed.append("duplicate key in shard" if key in seen else reason)
                seen.add(key)
            if keys:
                yield None, keys, failed
                last_key = keys[-1]
        start += rows


def _group_keys(
    pf: pq.ParquetFile, group: int, key_col: str | None, start: int, rows: int
) -> list[str]:
    """The keys of a row group whose data did not decode: its key column when that decodes
    on its own (and has one non-null key per row), else row numbers as for a keyless shard."""
    if key_col is not None:
        try:
            values = pf.read_row_group(group, columns=[key_col], use_threads=False)
            keys = values.column(0).to_pylist()
        except (pa.ArrowException, OSError):
            keys = []
        if len(keys) == rows and all(k is not None for k in keys):
            return [_key_text(k) for k in keys]
    return [f"{start + i:09d}" for i in range(rows)]


def read_parquet(
    ref: ShardRef,
    storage_options: dict | None = None,
    *,
    key_column: str = "__key__",
    batch_rows: int = 1024,
    columns: list[str] | None = None,
) -> Generator[Sample, None, None]:
    """Stream the rows of a Parquet shard as samples: ``fields`` maps column -> Python value.

    ``columns`` limits what is read (the key column is always read, and never a field). A row
    whose key appeared earlier comes out with ``error="duplicate key in shard"``, one with a
    null key with ``"null key in column ..."``. Raises ShardError for a file that cannot be
    opened or read.
    """
    with open_shard(ref.url, storage_options, pin=ref.pin) as f:
        pf = _open(ref, f)
        start = 0
        for batch, keys, errors in _keyed_batches(ref, pf, key_column, batch_rows, columns):
            values = (
                {
                    name: _python_values(batch.column(i))
                    for i, name in enumerate(batch.schema.names)
                    if name != key_column
                }
                if batch is not None
                else {}
            )
            for row, (key, error) in enumerate(zip(keys, errors, strict=True)):
                fields = {name: column[row] for name, column in values.items()}
                yield Sample(key=key, shard=ref.name, fields=fields, index=start + row, error=error)
            start += len(keys)


def _python_values(column: pa.Array) -> list:
    """A column's values for ``Sample.fields``: Python values, except that a tensor column
    (pyarrow's fixed_shape_tensor) gives one array of its shape per row, not a flat list."""
    if isinstance(column.type, pa.FixedShapeTensorType) and column.null_count == 0:
        return list(column.to_numpy_ndarray().copy())  # (rows, *shape) -> rows × shape, writable
    return column.to_pylist()


def sage_fields(keep: Mapping[str, Mapping[str, object]]) -> list[pa.Field]:
    """The ``sage_<name>`` columns emit appends, sorted by name so every shard agrees.

    Names come from the first value of ``keep`` (all values have the same names); with nothing
    kept, the standard names, so that an empty output shard has the same schema as the rest.
    """
    first = next(iter(keep.values()), None)
    names = sorted(first) if first is not None else sorted(SAGE_TYPES)
    return [pa.field(f"sage_{name}", _sage_type(name, keep)) for name in names]


def _sage_type(name: str, keep: Mapping[str, Mapping[str, object]]) -> pa.DataType:
    if name in SAGE_TYPES:
        return SAGE_TYPES[name]
    for value in keep.values():
        if value.get(name) is not None:
            return pa.array([value[name]]).type
    return pa.float64()


def copy_selected_parquet(
    ref: ShardRef,
    out: BinaryIO,
    keep: Mapping[str, Mapping[str, object]],
    storage_options: dict | None = None,
    *,
    key_column: str = "__key__",
) -> int:
    """Write the rows of a shard whose key is in ``keep`` to ``out``; returns rows written.

    Every original column keeps its name, type and position; ``sage_<name>`` columns are
    appended from ``keep[key]`` (see ``sage_fields``). Existing columns of those names (a shard
    that is itself an output) are replaced. Rows the reader flags (duplicate or null key) are
    never copied. With nothing kept the file is still valid, with the full schema. Reading
    stops once every kept row is out, so a break in the shard after them (recorded by the
    passes) does not stop emit. Output is deterministic. Raises ShardError as ``read_parquet``.
    """
    extra = sage_fields(keep)
    with open_shard(ref.url, storage_options, pin=ref.pin) as f:
        pf = _open(ref, f)
        replaced = {fld.name for fld in extra}
        original = [fld for fld in pf.schema_arrow if fld.name not in replaced]
        schema = pa.schema(original + extra, metadata=pf.schema_arrow.metadata)
        writer = pq.ParquetWriter(out, schema)
        buffered: list[pa.Table] = []
        written = 0
        batches = _keyed_batches(ref, pf, key_column, 1024, None) if keep else iter(())
        for batch, keys, errors in batches:
            if batch is None:
                continue  # a row group that did not decode: error rows, never kept
            table = _kept_rows(batch, keys, errors, keep, extra)
            if table is not None:
                buffered.append(table)
                written += table.num_rows
                buffered = _flush_if_full(writer, buffered)
            if written == len(keep):
                break  # every kept row is out: the rest of the shard is not needed
        _flush_if_full(writer, buffered, force=True)
        writer.close()
    return written


def _flush_if_full(
    writer: pq.ParquetWriter, buffered: list[pa.Table], force: bool = False
) -> list[pa.Table]:
    """Write the buffered rows as one row group when it is big enough; returns the rest."""
    rows = sum(t.num_rows for t in buffered)
    full = rows >= _ROW_GROUP_ROWS or sum(t.nbytes for t in buffered) >= _ROW_GROUP_BYTES
    if rows and (full or force):
        writer.write_table(pa.concat_tables(buffered), row_group_size=_ROW_GROUP_ROWS)
        return []
    return buffered


def _kept_rows(
    batch: pa.RecordBatch,
    keys: list[str],
    errors: list[str | None],
    keep: Mapping[str, Mapping[str, object]],
    extra: list[pa.Field],
) -> pa.Table | None:
    """The kept rows of a batch with the ``sage_*`` columns appended, or None if none kept."""
    mask = [k in keep and e is None for k, e in zip(keys, errors, strict=True)]
    if not any(mask):
        return None
    chosen = [k for k, ok in zip(keys, mask, strict=True) if ok]
    replaced = [fld.name for fld in extra if fld.name in batch.schema.names]
    table = pa.Table.from_batches([batch.filter(pa.array(mask))]).drop_columns(replaced)
    for fld in extra:
        name = fld.name.removeprefix("sage_")
        table = table.append_column(fld, pa.array([keep[k].get(name) for k in chosen], fld.type))
    return table
