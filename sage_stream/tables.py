"""The run's tables on storage: scores/part-<shard>.parquet and selection.parquet.

A scores part is written whole under a temporary name and moved into place, so a part that
exists is complete. A shard whose stream broke part-way still gets its part (the rows before
the break) and the reason in the part's metadata, which the manifest reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import InputError
from .sample import ShardRef
from .storage import atomic_write, exists, filesystem, join, open_input

SCORE_SCHEMA = pa.schema(
    [
        ("__key__", pa.string()),
        ("__shard__", pa.string()),
        ("label", pa.int64()),
        ("score", pa.float64()),
        ("loss", pa.float64()),
        ("grad_norm", pa.float64()),
        ("energy", pa.float64()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)
SCORE_COLUMNS = tuple(SCORE_SCHEMA.names)
SHARD_ERROR_KEY = b"sage_stream.shard_error"
SELECTION_KEY = b"sage_stream.selection"


def errored_count(table: pa.Table) -> int:
    """Rows of a scores table with status "error" (the rest are scored)."""
    if table.num_rows == 0:
        return 0
    return int(pc.sum(pc.equal(table["status"], "error")).as_py() or 0)


def part_url(out: str, shard: str) -> str:
    return join(out, "scores", f"part-{shard}.parquet")


def write_table(url: str, table: pa.Table, storage_options: dict | None = None) -> None:
    with atomic_write(url, storage_options) as f:
        pq.write_table(table, f)


def write_scores(
    url: str, table: pa.Table, shard_error: str | None, storage_options: dict | None = None
) -> None:
    metadata = {SHARD_ERROR_KEY: (shard_error or "").encode()}
    table = table.cast(SCORE_SCHEMA).replace_schema_metadata(metadata)
    write_table(url, table, storage_options)


def read_part(
    out: str, shard: str, columns: list[str] | None = None, storage_options: dict | None = None
) -> tuple[pa.Table, str | None]:
    """One shard's scores and its shard-level error (None if its stream was whole)."""
    url = part_url(out, shard)
    if not exists(url, storage_options):
        raise InputError(f"no scores for shard {shard!r} at {url}: run `sage-stream score` first")
    with open_input(url, storage_options) as f:
        table = pq.read_table(f, columns=columns)
    error = (table.schema.metadata or {}).get(SHARD_ERROR_KEY, b"").decode() or None
    return table.replace_schema_metadata(None), error


def read_scores(
    out: str, shards: Iterable[str], columns: list[str] | None = None, storage_options=None
) -> pa.Table:
    """The scores of the given shards, concatenated in shard order."""
    tables = [read_part(out, s, columns, storage_options)[0] for s in shards]
    if not tables:
        return SCORE_SCHEMA.empty_table().select(columns or list(SCORE_COLUMNS))
    return pa.concat_tables(tables)


def scored_shards(out: str, storage_options: dict | None = None) -> list[str]:
    """Shard names that have a scores part, in sorted order (for `select` without inputs)."""
    fs, path = filesystem(join(out, "scores"), storage_options)
    if not exists(join(out, "scores"), storage_options):
        raise InputError(f"no scores/ under {out}: run `sage-stream score` first")
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n[len("part-") : -len(".parquet")] for n in names if _is_part(n))


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def write_selection(
    out: str, table: pa.Table, params: dict, storage_options: dict | None = None
) -> str:
    url = join(out, "selection.parquet")
    meta = {SELECTION_KEY: json.dumps(params, sort_keys=True).encode()}
    write_table(url, table.replace_schema_metadata(meta), storage_options)
    return url


def read_selection(out: str, storage_options: dict | None = None) -> tuple[pa.Table, dict]:
    url = join(out, "selection.parquet")
    if not exists(url, storage_options):
        raise InputError(f"no selection at {url}: run `sage-stream select` first")
    with open_input(url, storage_options) as f:
        table = pq.read_table(f)
    params = json.loads((table.schema.metadata or {}).get(SELECTION_KEY, b"{}"))
    return table.replace_schema_metadata(None), params


def shard_names(refs: Iterable[ShardRef]) -> list[str]:
    return [r.name for r in refs]
