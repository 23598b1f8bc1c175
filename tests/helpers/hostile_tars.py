"""Tar streams with hand-made headers: claimed sizes, pax records, GNU long names, sparse maps.

Builders return raw bytes, header block by header block, so a test can say exactly what each
header claims (``tarfile`` itself refuses to write most of these).
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path

BLOCK = tarfile.BLOCKSIZE
END = b"\0" * (2 * BLOCK)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def size_field(size: int) -> bytes:
    """The 12-byte size field: octal when it fits, else GNU base-256 (negative too)."""
    if 0 <= size < 8**11:
        return f"{size:011o}\0".encode()
    return (b"\x80" if size >= 0 else b"\xff") + (size % 256**11).to_bytes(11, "big")


def header(name: str | bytes = "a.npy", size: int = 0, typeflag: bytes = b"0",
           raw: dict[int, bytes] | None = None) -> bytes:  # fmt: skip
    """One ustar header block; ``raw`` overwrites bytes at offsets before the checksum."""
    info = tarfile.TarInfo("x")
    info.type = tarfile.REGTYPE
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT)[:BLOCK])
    name_b = name.encode() if isinstance(name, str) else name
    block[0:100] = name_b[:100].ljust(100, b"\0")
    block[124:136] = size_field(size)
    block[156:157] = typeflag
    for offset, data in (raw or {}).items():
        block[offset : offset + len(data)] = data
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def member(name: str | bytes, data: bytes, **kw: object) -> bytes:
    return header(name, len(data), **kw) + pad(data)  # type: ignore[arg-type]


def pax_record(keyword: str, value: str | bytes) -> bytes:
    body = f" {keyword}=".encode() + (value.encode() if isinstance(value, str) else value) + b"\n"
    length = len(body)
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def pax(records: bytes, typeflag: bytes = b"x", claim: int | None = None) -> bytes:
    """A pax header member holding ``records`` (its size field says ``claim`` if given)."""
    size = len(records) if claim is None else claim
    return header("././@PaxHeader", size, typeflag) + pad(records)


def long_name(name: bytes, typeflag: bytes = b"L") -> bytes:
    return header("././@LongLink", len(name), typeflag) + pad(name)


def sample(key: str, label: int = 1) -> bytes:
    return member(f"{key}.npy", NPY) + member(f"{key}.cls", str(label).encode())


def _npy() -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ones(8, np.float32), allow_pickle=False)  # tiny.DIM
    return buf.getvalue()


NPY = _npy()


def gzip_bytes(data: bytes) -> bytes:
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def write_big_header_tgz(path: Path, kind: str, size: int) -> Path:
    """A .tar.gz: one good sample, then a pax record or GNU long name of ``size`` bytes
    (streamed through zlib, never whole in memory), then a sample it describes and another."""
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(path, "wb") as f:
        f.write(c.compress(sample("s0")))
        if kind == "pax":
            prefix = f"{size} comment=".encode()
            f.write(c.compress(header("././@PaxHeader", size, b"x") + prefix))
            body = size - len(prefix) - 1
        else:
            f.write(c.compress(header("././@LongLink", size, b"L")))
            body = size
        for chunk in _chunks(body):
            f.write(c.compress(chunk))
        tail = (b"\n" if kind == "pax" else b"") + b"\0" * (-size % BLOCK)
        f.write(c.compress(tail + sample("s1") + sample("s2") + END))
        f.write(c.flush())
    return path


def _chunks(total: int, step: int = 2**20) -> Iterable[bytes]:
    block = b"a" * step
    while total > 0:
        yield block[: min(step, total)]
        total -= step
