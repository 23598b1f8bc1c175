"""select/classmeans.py's exact integer sums: the Gram matrix at BLAS speed, exact at the bounds."""

import numpy as np

from sage_stream.select import classmeans


def test_exact_gram_equals_integer_arithmetic_at_the_bounds():
    rng = np.random.default_rng(0)
    top = 1 << classmeans.FIXED_BITS
    q = rng.integers(-top, top + 1, (5000, 32))
    q[:3] = np.array([top, -top, 0])[:, None]  # the extremes fixed() can give
    got = classmeans.exact_gram(q)
    want = [[sum(int(a) * int(b) for a, b in zip(q[:, i], q[:, j], strict=True))
             for j in range(32)] for i in range(32)]  # fmt: skip
    assert got.tolist() == want
    full = np.full((1 << classmeans.FIXED_BITS, 2), -top, dtype=np.int64)  # the largest sum
    assert classmeans.exact_gram(full).tolist() == [[top**2 * len(full)] * 2] * 2


def test_fixed_point_scale_and_signatures_of_candidates_only():
    import pyarrow as pa

    sig = [[1.0, -2.0], None, [0.5, 4.0]]
    table = pa.table({"signature": pa.array(sig, pa.list_(pa.float32(), 2))})
    ok = np.array([True, False, True])
    s = classmeans.signatures(table, ok)
    assert s.tolist() == [[1.0, -2.0], [0.0, 0.0], [0.5, 4.0]]
    assert classmeans.largest(s, ok) == 4.0
    assert classmeans.fixed(s, 4.0)[2].tolist() == [1 << 17, 1 << 20]
    assert classmeans.signatures(table, np.ones(3, dtype=bool)) is None  # a candidate unsigned


def test_class_sums_and_counts_are_exact_for_few_and_many_classes():
    rng = np.random.default_rng(1)
    top = 1 << classmeans.FIXED_BITS
    for classes in (3, classmeans.ONE_HOT_CLASSES + 5):  # a one-hot product; sorted sums
        labels = rng.integers(0, classes, 3000) * 7 - 1  # one label -1 (null): no lookup table
        q = rng.integers(-top, top + 1, (3000, 4)).astype(np.float64)
        got = classmeans.part_sums(q, labels)
        for c in np.unique(labels).tolist():
            mine = q[labels == c].astype(np.int64)
            assert got.n[c] == len(mine)
            assert got.total[c].tolist() == [sum(int(v) for v in mine[:, j]) for j in range(4)]
        assert list(got.n) == sorted(got.n)
        assert classmeans.by_class(labels + 1)[0].tolist() == sorted(set((labels + 1).tolist()))
