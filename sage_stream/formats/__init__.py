"""Shard formats at the two edges of the flow: read samples in, copy kept samples out.

Everything between reading and emitting sees only ``Sample``; this package is the one place
that knows a shard is a tar or a Parquet file. Each format is a `ShardFormat` in one registry,
`FORMATS`: its name, the file suffixes that mean it, its reader options, and how to read it,
copy kept samples out of it and count the samples of an output. ``read_shard`` and
``copy_selected`` look the format of a ``ShardRef`` up there; a new format is one entry.

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
import tarfile
from collections.abc import Generator, Mapping
from typing import Any, BinaryIO, Protocol, cast

import pyarrow.parquet as pq

from sage_stream.errors import InputError
from sage_stream.formats.parquet import copy_selected_parquet, read_parquet
from sage_stream.formats.tar import TarShardWriter, copy_selected_tar, read_tar
from sage_stream.formats.tar_headers import CheckedTarInfo, count_plain
from sage_stream.sample import Sample, ShardRef

__all__ = [
    "FORMATS",
    "ShardFormat",
    "TarShardWriter",
    "copy_selected",
    "copy_selected_parquet",
    "copy_selected_tar",
    "format_named",
    "read_parquet",
    "read_shard",
    "read_tar",
    "sage_json",
]

Keep = Mapping[str, Mapping[str, object]]  # key -> the score record emit attaches


class ShardFormat(Protocol):
    """What the flow needs of a shard format."""

    name: str  # ShardRef.format
    suffixes: tuple[str, ...]  # file name endings that mean this format (lower case)
    options: dict[str, type]  # its reader options: Config fields, and their types

    def read(
        self, ref: ShardRef, storage_options: dict | None, **options: Any
    ) -> Generator[Sample, None, None]:
        """Stream the samples of one shard."""
        ...

    def copy_selected(self, ref: ShardRef, out: BinaryIO, keep: Keep,
                      storage_options: dict | None, **options: Any) -> int:  # fmt: skip
        """Write the kept samples of ``ref`` to ``out`` with their score record; how many."""
        ...

    def count(self, f: Any) -> int:  # a readable, seekable binary file
        """Samples in an output file of this format (to check it before _SUCCESS)."""
        ...


class TarFormat:
    name: str = "tar"
    suffixes: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
    options: dict[str, type] = {"max_member_bytes": int, "max_sample_bytes": int}

    def read(
        self, ref: ShardRef, storage_options: dict | None, **options: Any
    ) -> Generator[Sample, None, None]:
        return read_tar(ref, storage_options, **options)

    def copy_selected(self, ref: ShardRef, out: BinaryIO, keep: Keep,
                      storage_options: dict | None, **options: Any) -> int:  # fmt: skip
        encoded = {key: sage_json(record) for key, record in keep.items()}
        if not is_gzip_name(ref.name):
            return copy_selected_tar(ref, out, encoded, storage_options, **options)
        # an output keeps its input's name, so a .tar.gz/.tgz is written gzipped; mtime 0
        # and no file name in the gzip header keep it byte-identical between runs
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
            return copy_selected_tar(ref, cast(BinaryIO, gz), encoded, storage_options,
                                     **options)  # fmt: skip

    def count(self, f: Any) -> int:  # a readable, seekable binary file
        # one `.sage.json` member per emitted sample, from the headers, seeking over the data:
        # plain headers by a walk of their own (half the CPU of tarfile's), anything else
        # (gzipped, PAX, long names) through the bounded header parser
        plain = count_plain(f, b".sage.json")
        if plain is not None:
            return plain
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:*", tarinfo=CheckedTarInfo) as tf:  # or gzipped
            return sum(1 for m in tf if m.name.endswith(".sage.json"))


class ParquetFormat:
    name: str = "parquet"
    suffixes: tuple[str, ...] = (".parquet", ".pq")
    options: dict[str, type] = {"key_column": str}

    def read(
        self, ref: ShardRef, storage_options: dict | None, **options: Any
    ) -> Generator[Sample, None, None]:
        return read_parquet(ref, storage_options, **options)

    def copy_selected(self, ref: ShardRef, out: BinaryIO, keep: Keep,
                      storage_options: dict | None, **options: Any) -> int:  # fmt: skip
        return copy_selected_parquet(ref, out, keep, storage_options, **options)

    def count(self, f: Any) -> int:  # a readable, seekable binary file
        return pq.ParquetFile(f).metadata.num_rows  # the footer's row count


FORMATS: dict[str, ShardFormat] = {f.name: f for f in (TarFormat(), ParquetFormat())}


def format_named(name: str, url: str = "") -> ShardFormat:
    if name not in FORMATS:
        raise InputError(f"{url}: unknown shard format {name!r}")
    return FORMATS[name]


def read_shard(
    ref: ShardRef, storage_options: dict | None = None, **kw: Any
) -> Generator[Sample, None, None]:
    """Stream the samples of one shard; ``kw`` are its format's reader options."""
    return format_named(ref.format, ref.url).read(ref, storage_options, **kw)


def copy_selected(
    ref: ShardRef,
    out: BinaryIO,
    keep: Keep,
    storage_options: dict | None = None,
    **kw: Any,
) -> int:
    """Copy the samples of ``ref`` whose key is in ``keep`` to ``out`` with their score record.

    Returns the number of samples written. ``kw`` goes to the format's copier (e.g.
    ``key_column`` for Parquet). See the module docstring for how the record is stored.
    """
    return format_named(ref.format, ref.url).copy_selected(ref, out, keep, storage_options, **kw)


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
