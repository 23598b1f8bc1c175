"""The selection's warnings (sage_stream.select.warn): the streaming spread of the scores."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sage_stream.select.warn import Spread


def test_spread_merges_parts_like_one_pass():
    values = np.random.default_rng(0).normal(size=100)
    s = Spread()
    for part in np.array_split(values, 7):
        s.add(pa.array(list(part) + [None]))
    assert s.n == 100 and abs(s.std - values.std()) < 1e-9
    assert s.low == values.min() and s.high == values.max()
