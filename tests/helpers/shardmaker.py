"""Tiny shards for tests: tar and Parquet, written through fsspec (paths or memory:// URLs).

Import from any test module: ``from shardmaker import make_tar_shard, npy_bytes, png_bytes``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sage_stream.formats.tar import TarShardWriter

Samples = Mapping[str, Mapping[str, bytes]] | Iterable[tuple[str, Mapping[str, bytes]]]


def tar_bytes(samples: Samples) -> bytes:
    """A tar archive of ``{key: {field: bytes}}`` (or ``[(key, fields), ...]``) in order."""
    items = samples.items() if isinstance(samples, Mapping) else samples
    buf = io.BytesIO()
    with TarShardWriter(buf) as writer:
        for key, fields in items:
            writer.write(key, fields)
    return buf.getvalue()


def write_bytes(url: str | Path, data: bytes) -> str:
    """Write ``data`` to a local path or fsspec URL; returns the URL as a string."""
    url = str(url)
    with fsspec.open(url, "wb", auto_mkdir=True) as f:
        f.write(data)
    return url


def make_tar_shard(url: str | Path, samples: Samples) -> str:
    """Write a tar shard of ``samples`` to ``url``; returns the URL."""
    return write_bytes(url, tar_bytes(samples))


def make_parquet_shard(
    url: str | Path,
    columns: Mapping[str, list] | pa.Table,
    *,
    row_group_size: int | None = None,
) -> str:
    """Write a Parquet shard of ``{column: values}`` (or a Table) to ``url``; returns the URL."""
    table = columns if isinstance(columns, pa.Table) else pa.table(dict(columns))
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return write_bytes(url, buf.getvalue())


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def image_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode a uint8 (H, W) or (H, W, 3) array as PNG/JPEG/WEBP bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    return image_bytes(array, "PNG")


def digit_samples(n: int, *, prefix: str = "s", dim: int = 4, classes: int = 3) -> dict:
    """``n`` samples of ``<key>.npy`` (float32 vector) + ``<key>.cls``, deterministic."""
    rng = np.random.default_rng(n)
    return {
        f"{prefix}{i:04d}": {
            "npy": npy_bytes(rng.standard_normal(dim).astype(np.float32)),
            "cls": str(i % classes).encode(),
        }
        for i in range(n)
    }
