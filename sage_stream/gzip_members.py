"""Gzipped members (`x.npy.gz`, `x.json.gz`, `x.txt.gz`) decompressed before decoding, as
webdataset's decoders do, in bounded memory.

Where it sits: read (formats) → **gzip_members** → fields → decode. A field whose name ends in
`.gz` and whose value is bytes is decompressed, and the sample gets it under the name without
`.gz` (`npy.gz` → `npy`, so that the built-in decoders, the input search and `--label-key cls`
find it) as well as under its own name (`--input-key npy.gz`, as a webdataset user writes it).
A field of that name that the sample already has is left as it is.

Shards are untrusted: a few KiB of gzip can expand to gigabytes. Decompression stops as soon
as the output passes `--max-member-bytes`, and the sample becomes an error row saying so. The
output never holds more than the cap; while it grows (a bytearray that reallocates) and when
it becomes bytes, memory peaks at about twice the cap plus one input chunk, whatever the
member claims: measured 513 MiB for a 1 GiB bomb under the default 256 MiB cap, 3 MiB under a
1 MiB cap (tracemalloc). A member that is not gzip data is an error row too. Emit still copies the original, compressed bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .errors import SampleError
from .sample import Sample

SUFFIX = ".gz"
GZIP_WBITS = 31  # zlib: a gzip header and trailer
GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 1 << 20  # compressed bytes fed per step


def gunzip(data: bytes, limit: int) -> bytes:
    """The decompressed bytes of gzip `data` (concatenated gzip members too, as `gzip` reads
    them; bytes after the last member that do not start another are ignored, as gzip ignores
    padding); ValueError when the output would exceed `limit` bytes or the data is not gzip."""
    out = bytearray()
    view, start = memoryview(data), 0
    while start < len(view) and view[start : start + 2] == GZIP_MAGIC:
        inflater, pos = zlib.decompressobj(GZIP_WBITS), start
        while not inflater.eof:
            chunk: bytes | memoryview = inflater.unconsumed_tail  # no room for it last call
            if not chunk:
                if pos >= len(view):
                    raise ValueError("gzip data ends before its end marker (truncated)")
                chunk, pos = view[pos : pos + CHUNK], pos + CHUNK
            out += inflater.decompress(chunk, limit + 1 - len(out))  # never more than the cap
            if len(out) > limit:
                raise ValueError(
                    f"decompresses to more than {limit} bytes (--max-member-bytes): not decoded"
                )
        start = min(pos, len(view)) - len(inflater.unused_data)  # where the next member starts
    if start == 0:
        raise ValueError("not gzip data")
    return bytes(out)


def gunzip_fields(sample: Sample, limit: int) -> Sample:
    """The sample with its `.gz` byte fields decompressed (see the module docstring)."""
    names = [n for n, v in sample.fields.items() if n.endswith(SUFFIX) and isinstance(v, bytes)]
    if not names:
        return sample
    fields = dict(sample.fields)
    for name in names:
        try:
            data = gunzip(fields[name], limit)
        except (ValueError, zlib.error) as exc:
            reason = f"cannot decompress {name!r}: {exc}"
            raise SampleError(sample.shard, sample.key, reason) from None
        fields[name] = data
        fields.setdefault(name[: -len(SUFFIX)], data)
    return replace(sample, fields=fields)


def gunzipped(decoder: Callable[[Sample], Any], limit: int, sample: Sample) -> Any:
    """`decoder` on the sample with its `.gz` fields decompressed (bind with functools.partial:
    picklable for the loader's processes)."""
    return decoder(gunzip_fields(sample, limit))
