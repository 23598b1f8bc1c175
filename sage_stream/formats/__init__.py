"""Shard formats at the two edges of the flow: read samples in, copy kept samples out.

Everything between reading and emitting sees only ``Sample``; this package is the one place
that knows a shard is a tar or a Parquet file. ``read_shard`` and ``copy_selected`` dispatch on
``ShardRef.format``.

The score record that emit attaches to each kept sample is one convention for both formats:
``keep`` maps key -> a flat dict such as ``{"score": 0.93, "label": 3, "loss": 0.21,
"grad_norm": 1.7, "energy": 0.88, "scorer": "sage"}``.

- tar: the dict is written as a ``<key>.sage.json`` member, compact JSON with sorted keys
  (non-finite floats become ``null`` so the member is valid JSON).
- Parquet: each entry becomes a column ``sage_<name>`` (numbers as float64/int64, strings as
  string), appended after the original columns.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Generator, Mapping
from typing import Any, BinaryIO, cast

from sage_stream.errors import InputError
from sage_stream.formats.parquet import copy_selected_parquet, read_parquet
from sage_stream.formats.tar import TarShardWriter, copy_selected_tar, read_tar
from sage_stream.sample import Sample, ShardRef

__all__ = [
    "TarShardWriter",
    "copy_selected",
    "copy_selected_parquet",
    "copy_selected_tar",
    "read_parquet",
    "read_shard",
    "read_tar",
    "sage_json",
]


def read_shard(
    ref: ShardRef, storage_options: dict | None = None, **kw: Any
) -> Generator[Sample, None, None]:
    """Stream the samples of one shard; ``kw`` goes to ``read_tar`` or ``read_parquet``."""
    if ref.format == "tar":
        return read_tar(ref, storage_options, **kw)
    if ref.format == "parquet":
        return read_parquet(ref, storage_options, **kw)
    raise InputError(f"{ref.url}: unknown shard format {ref.format!r}")


def copy_selected(
    ref: ShardRef,
    out: BinaryIO,
    keep: Mapping[str, Mapping[str, object]],
    storage_options: dict | None = None,
    **kw: Any,
) -> int:
    """Copy the samples of ``ref`` whose key is in ``keep`` to ``out`` with their score record.

    Returns the number of samples written. ``kw`` goes to the format's copier (e.g.
    ``key_column`` for Parquet). See the module docstring for how the record is stored.
    """
    if ref.format == "tar":
        encoded = {key: sage_json(record) for key, record in keep.items()}
        if not is_gzip_name(ref.name):
            return copy_selected_tar(ref, out, encoded, storage_options, **kw)
        # an output keeps its input's name, so a .tar.gz/.tgz is written gzipped; mtime 0
        # and no file name in the gzip header keep it byte-identical between runs
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
            return copy_selected_tar(ref, cast(BinaryIO, gz), encoded, storage_options, **kw)
    if ref.format == "parquet":
        return copy_selected_parquet(ref, out, keep, storage_options, **kw)
    raise InputError(f"{ref.url}: unknown shard format {ref.format!r}")


def is_gzip_name(name: str) -> bool:
    """Whether a tar shard's name says it is gzipped (`.tar.gz`, `.tgz`)."""
    return name.lower().endswith((".tar.gz", ".tgz"))


def sage_json(record: Mapping[str, object]) -> bytes:
    """The bytes of a ``<key>.sage.json`` member: compact, sorted, deterministic JSON."""
    plain = {name: _plain(value) for name, value in record.items()}
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _plain(value: object) -> object:
    """JSON-ready value: numpy scalars to Python, NaN/inf to None (JSON has no NaN)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()  # numpy and torch scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
