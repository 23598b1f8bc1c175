"""``.npy`` members to arrays: the first step of decoding an ``npy`` input (``decoder.decode_npy``).

``np.load`` parses every member's header with ``ast.literal_eval``: 0.15 ms a member, more
than the copy of a small array, though a shard's members nearly always share one header. So a
header seen before (the same bytes) is not parsed again: its dtype, shape and order come from
a small cache, filled only by numpy's own parser, and the data is copied out as ``np.load``
copies it. Anything else goes to ``np.load`` as it is, so its checks and errors are unchanged:
a header not seen before, a version other than 1.0, object or structured dtypes (never
unpickled: ``allow_pickle=False``), an empty array, data shorter than the header says, an
``.npz`` or a pickle.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np

_MAGIC_1_0 = b"\x93NUMPY\x01\x00"
_CACHED_HEADERS = 64  # distinct headers kept; a shard of varied shapes clears and refills it
_CACHED_HEADER_BYTES = 4096  # a longer header is parsed by np.load each time
_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """What ``np.load(io.BytesIO(data), allow_pickle=False)`` returns, for ``.npy`` bytes."""
    array = _from_known_header(data)
    if array is not None:
        return array
    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    _remember_header(data)  # only once np.load has accepted the whole member
    return loaded


def _header(data: bytes) -> tuple[bytes, int] | None:
    """(header bytes, offset of the data) of a version 1.0 ``.npy``, else None."""
    if len(data) < 10 or not data.startswith(_MAGIC_1_0):
        return None
    end = 10 + int.from_bytes(data[8:10], "little")
    if end > len(data) or end - 10 > _CACHED_HEADER_BYTES:
        return None
    return data[10:end], end


def _from_known_header(data: bytes) -> np.ndarray | None:
    found = _header(data)
    parsed = _headers.get(found[0]) if found is not None else None
    if found is None or parsed is None:
        return None
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    if len(data) - found[1] < count * dtype.itemsize:
        return None  # short data: np.load says so
    # np.load reads into a new array: writable and owning its memory, as this copy
    array = np.frombuffer(data, dtype=dtype, count=count, offset=found[1]).copy()
    if fortran:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def _remember_header(data: bytes) -> None:
    """Cache the header of a member np.load has just read, if it is a plain one."""
    found = _header(data)
    if found is None or found[0] in _headers:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a header numpy parses only with a warning: not cached
        try:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(
                io.BytesIO(data[8 : found[1]])
            )
        except (ValueError, UserWarning):
            return
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        return
    if dtype.itemsize == 0 or math.prod(shape) == 0:
        return
    if len(_headers) >= _CACHED_HEADERS:
        _headers.clear()
    _headers[found[0]] = (dtype, tuple(shape), bool(fortran))
