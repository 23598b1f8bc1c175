"""decode/npy.py: a header seen before is not parsed again, and the array is np.load's."""

from __future__ import annotations

import io

import numpy as np
import pytest

from sage_stream.decode import npy


def _bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.arange(5, dtype=">i4"),
    np.array(3.5, dtype=np.float16),
    np.array([[True, False]]),
    np.arange(6, dtype=np.complex64).reshape(1, 2, 3),
    np.zeros((0, 3), dtype=np.float32),
    np.zeros(2, dtype=[("a", "<f4"), ("b", "<i2")]),
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_a_known_header_gives_what_np_load_gives(array, monkeypatch):
    data = _bytes(array)
    ref = np.load(io.BytesIO(data), allow_pickle=False)
    first = npy.load_npy(data)  # np.load's own, and the header remembered if plain
    plain = array.dtype.fields is None and array.size > 0
    assert (data[10 : 10 + int.from_bytes(data[8:10], "little")] in npy._headers) == plain
    if plain:  # the second read must not go through np.load
        monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load called"))
    again = npy.load_npy(data)
    for got in (first, again):
        assert (got.dtype, got.shape, got.strides) == (ref.dtype, ref.shape, ref.strides)
        assert got.flags.writeable and got.flags.c_contiguous == ref.flags.c_contiguous
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(got, array)
    assert again.base is None or not isinstance(again.base, bytes)  # not a view of the member


def test_short_data_after_a_known_header_is_np_loads_error():
    data = _bytes(np.arange(100, dtype=np.float32))
    npy.load_npy(data)
    with pytest.raises(ValueError) as ours:
        npy.load_npy(data[:-4])
    with pytest.raises(ValueError) as theirs:
        np.load(io.BytesIO(data[:-4]), allow_pickle=False)
    assert str(ours.value) == str(theirs.value)


def test_the_cache_stays_small():
    for n in range(1, 3 * npy._CACHED_HEADERS):
        npy.load_npy(_bytes(np.zeros(n, dtype=np.float32)))
    assert 0 < len(npy._headers) <= npy._CACHED_HEADERS
