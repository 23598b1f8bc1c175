"""Nearest class mean: is a sample's signature nearer another class's mean than its own?

Where it sits: ``scores/`` (column ``signature``, pass 2: a 32-number projection of h, the input
of the classifier's head; sage_stream/signature.py) → **class means** → the `sage-coverage`
filter (coverage.py): a candidate whose signature is nearer, in the Mahalanobis distance of
the pooled within-class covariance, to another class's mean than to its own class's is set
aside as likely mislabelled (decision ``other_class``).

Why this test (issue 28, docs/quality.md): a proxy trained on noisy labels learns to predict
many of the flipped labels it was trained on (its loss, margin and gradients then look like a
hard sample's), but the head's input h of a flipped sample stays with its true class. A
nearest-class-mean classifier with a shared covariance (linear discriminant analysis) has C
means and one covariance, too few parameters to follow single samples, so it still sees the
flip. On the quality benchmark it flagged 85-99% of the flipped labels with 2.8-8% of the
correct ones, with proxies trained 20 or 300 steps, where the ridge-leverage cap it replaces
set aside 9-25% of clean pools, their hardest samples.

Exact and bounded, whatever N and the part order: the first parameter pass finds the largest
|s| over the candidates (a maximum is exact in any order); the second sums, in fixed point
(q = round(s · 2^20 / max|s|), int64 within a part, Python integers across parts), each
class's count and Σq, and Σ q qᵀ over all candidates. Means and covariance follow from those
integers, so the same rows in any parts give the same filter. Memory: K + 1 integers per class
and K² more (K = 32). The distances of one part's rows to every class mean are computed in
chunks of at most `CELLS` row-class pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError

SIGNATURE = "signature"
FIXED_BITS = 20  # |q| ≤ 2^20: a product ≤ 2^40, a sum over 2^20 rows < 2^61 in int64
CELLS = 1 << 22  # row × class distances computed at once (32 MiB of float64)
RIDGE = 1e-6  # added to the covariance, times its mean eigenvalue: never singular


def signatures(table: pa.Table, ok: np.ndarray) -> np.ndarray | None:
    """(n, K) float64 signatures of the table's rows (zeros where not `ok`), or None when some
    candidate has none (params mode, scores of an older version, no column)."""
    if SIGNATURE not in table.column_names:
        return None if ok.any() else np.zeros((len(ok), 0))
    column = table[SIGNATURE]
    if column.null_count and not pc.is_valid(column).to_numpy(zero_copy_only=False)[ok].all():
        return None  # checked before any copy: scores without signatures have them all null
    if pa.types.is_fixed_size_list(column.type) and ok.any():  # as pass 2 writes them
        stored = _stored(column)
        out = np.zeros((len(ok), stored.shape[1]))
        out[ok] = stored[ok]
        return out
    cand = column.filter(pa.array(ok))
    if cand.null_count:
        return None
    flat = pc.list_flatten(cand).to_numpy(zero_copy_only=False).astype(np.float64)
    k = len(flat) // len(cand) if len(cand) else 0
    if k * len(cand) != len(flat):  # lists of different lengths: not signatures
        return None
    out = np.zeros((len(ok), k))
    if k:
        out[ok] = flat.reshape(-1, k)
    return out


def _stored(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, K) values of a fixed_size_list column as stored (null rows' slots included)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    k = arr.type.list_size
    flat = arr.values.slice(arr.offset * k, len(arr) * k).to_numpy(zero_copy_only=False)
    return flat.reshape(len(arr), k)


def top(table: pa.Table, ok: np.ndarray) -> float | None:
    """`largest(signatures(table, ok), ok)`, None where that is None; for signatures as pass 2
    writes them, from the stored float32 values (max and abs are exact) without a copy."""
    column = table[SIGNATURE] if SIGNATURE in table.column_names else None
    if column is None or not ok.any() or not pa.types.is_fixed_size_list(column.type):
        sig = signatures(table, ok)
        return None if sig is None else _finite(largest(sig, ok), table, ok)
    if column.null_count and not pc.is_valid(column).to_numpy(zero_copy_only=False)[ok].all():
        return None
    cand = _stored(column)[ok]
    return _finite(float(np.maximum(cand.max(), -cand.min())) if cand.size else 0.0, table, ok)


def _finite(value: float, table: pa.Table, ok: np.ndarray) -> float:
    """`value` if finite; else an InputError naming the first candidate whose signature holds
    NaN or inf (pass 2 never writes one; a NaN would make the scale depend on the part order)."""
    if np.isfinite(value):
        return value
    sig = signatures(table, ok)
    bad = ok & ~np.isfinite(sig).all(axis=1) if sig is not None else ok
    i = int(np.flatnonzero(bad)[0]) if bad.any() else 0
    where = {c: table[c][i].as_py() for c in ("__shard__", "__key__") if c in table.column_names}
    raise InputError(
        f"scores of shard {where.get('__shard__')!r}, key {where.get('__key__')!r}: its near-copy "
        "signature holds NaN or inf, which pass 2 never writes: score that shard again"
    )


def largest(sig: np.ndarray, ok: np.ndarray) -> float:
    """max |s| over the candidates (0 when none): sets the fixed-point scale. The other rows of
    `sig` are zeros (`signatures`), so the maximum over every row is the same, without a copy."""
    return float(np.maximum(sig.max(), -sig.min())) if ok.any() and sig.size else 0.0


def fixed(sig: np.ndarray, top: float) -> np.ndarray:
    """round(s · 2^FIXED_BITS / top) as int64 (top: `largest` over all the parts)."""
    scale = 2.0**FIXED_BITS / top if top > 0 else 0.0
    return np.rint(sig * scale).astype(np.int64)


def fixed_candidates(table: pa.Table, ok: np.ndarray, top: float) -> np.ndarray | None:
    """`fixed(signatures(table, ok), top)[ok]` as float64 (the same integers, −0 as 0), or None
    where `signatures` is None. For signatures as pass 2 writes them, straight from the stored
    float32 values: one (candidates, K) array instead of three (n, K) copies."""
    column = table[SIGNATURE] if SIGNATURE in table.column_names else None
    if column is None or not ok.any() or not pa.types.is_fixed_size_list(column.type):
        sig = signatures(table, ok)
        return None if sig is None else fixed(sig, top)[ok].astype(np.float64)
    if column.null_count and not pc.is_valid(column).to_numpy(zero_copy_only=False)[ok].all():
        return None
    stored = _stored(column)
    scale = 2.0**FIXED_BITS / top if top > 0 else 0.0
    q = np.multiply(stored if ok.all() else stored[ok], scale, dtype=np.float64)  # as sig * scale
    np.rint(q, out=q)
    q += 0.0  # −0.0 → 0.0, as the int64 round trip gives
    return q


@dataclass
class MeanSums:
    """Counts and fixed-point sums; partials of disjoint parts add up exactly."""

    n: dict[int, int] = field(default_factory=dict)
    total: dict[int, np.ndarray] = field(default_factory=dict)  # label -> (K,) Python ints
    outer: np.ndarray | None = None  # (K, K) Python ints: Σ q qᵀ over every candidate

    def add(self, other: MeanSums) -> MeanSums:
        for label, n in other.n.items():
            self.n[label] = self.n.get(label, 0) + n
            self.total[label] = self.total.get(label, 0) + other.total[label]
        if other.outer is not None:
            self.outer = other.outer if self.outer is None else self.outer + other.outer
        return self


def part_sums(q: np.ndarray, labels: np.ndarray) -> MeanSums:
    """One part's counts and sums of its candidates' fixed-point signatures `q` (integers, as
    `fixed_candidates` gives them) and their labels."""
    out = MeanSums()
    if not len(q):
        return out
    outer = np.zeros((q.shape[1], q.shape[1]), dtype=object)
    for start in range(0, len(q), 1 << FIXED_BITS):
        outer = outer + exact_gram(q[start : start + (1 << FIXED_BITS)])
    out.outer = outer
    classes, inverse, counts = by_class(labels)
    totals = class_sums(q, inverse, len(classes)).astype(np.int64)
    for i, label in enumerate(classes.tolist()):
        out.n[int(label)] = int(counts[i])
        out.total[int(label)] = totals[i].astype(object)
    return out


def by_class(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`np.unique(labels, return_inverse=True, return_counts=True)`, by a lookup table for
    small labels (no sort)."""
    if len(labels) and labels.min() >= 0 and labels.max() < 1 << 20:
        counts = np.bincount(labels)
        present = counts > 0
        return np.flatnonzero(present), (np.cumsum(present) - 1)[labels], counts[present]
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return classes, inverse.reshape(-1), counts


ONE_HOT_CLASSES = 32  # up to this many classes, class sums by a one-hot product (BLAS)


def class_sums(q: np.ndarray, inverse: np.ndarray, classes: int) -> np.ndarray:
    """(classes, K) float64: Σ q over each class's rows (`inverse`: each row's class). Sums of
    integers, exact in any order while |Σ| ≤ 2^FIXED_BITS · rows < 2^53 (parts < 2^33 rows)."""
    if classes > ONE_HOT_CLASSES:  # a one-hot product would cost classes × the rows
        order = np.argsort(inverse, kind="stable")
        starts = np.searchsorted(inverse[order], np.arange(classes))
        return np.add.reduceat(np.asarray(q, dtype=np.float64)[order], starts, axis=0)
    out = np.zeros((classes, q.shape[1]))
    ids = np.arange(classes)[:, None]
    for start in range(0, len(q), 1 << 16):
        mine = slice(start, start + (1 << 16))
        out += (inverse[mine] == ids).astype(np.float64) @ np.asarray(q[mine], dtype=np.float64)
    return out


GRAM_ROWS = 1 << (53 - 2 * FIXED_BITS)  # 2^13 rows: their float64 Gram is exact (below)


def exact_gram(q: np.ndarray) -> np.ndarray:
    """qᵀq exactly, as Python integers, for |q| ≤ 2^FIXED_BITS and at most 2^FIXED_BITS rows, at
    BLAS speed: every product is at most 2^(2·FIXED_BITS) and every sum over `GRAM_ROWS` rows
    at most 2^53, so each chunk's float64 Gram holds exact integers in any summation order; the
    chunks add up in int64 (at most 2^(3·FIXED_BITS) < 2^63). (numpy's int64 matmul is not
    BLAS: 20 times slower.)"""
    f = np.asarray(q, dtype=np.float64)
    total = np.zeros(f.shape[1:] * 2, dtype=np.int64)
    for start in range(0, len(f), GRAM_ROWS):
        chunk = f[start : start + GRAM_ROWS]
        total += (chunk.T @ chunk).astype(np.int64)
    return total.astype(object)


@dataclass(frozen=True)
class ClassMeans:
    """Class means and the whitening of the pooled within-class covariance (fixed-point units)."""

    labels: np.ndarray  # (C,) int64, sorted
    counts: np.ndarray  # (C,)
    means: np.ndarray  # (C, K) whitened
    whiten: np.ndarray  # (K, K): y = q @ whiten has identity within-class covariance


def class_means(got: MeanSums) -> ClassMeans | None:
    """The means and whitening from the integer sums; None with fewer than two classes."""
    if len(got.n) < 2 or got.outer is None:
        return None
    labels = np.array(sorted(got.n), dtype=np.int64)
    counts = np.array([got.n[c] for c in labels.tolist()], dtype=np.float64)
    totals = np.array([[float(v) for v in got.total[c]] for c in labels.tolist()])
    means = totals / counts[:, None]
    scatter = np.array(got.outer, dtype=np.float64) - (totals.T / counts) @ totals
    cov = scatter / max(float(counts.sum()) - len(labels), 1.0)
    cov = (cov + cov.T) / 2.0
    k = cov.shape[0]
    cov = cov + RIDGE * max(float(np.trace(cov)) / k, 1e-300) * np.eye(k)
    values, vectors = np.linalg.eigh(cov)
    whiten = vectors / np.sqrt(np.clip(values, 1e-300, None))
    return ClassMeans(labels, counts, means @ whiten, whiten)


def class_margin(
    cm: ClassMeans, q: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (d_other − d_own)/(d_other + d_own) ∈ [−1, 1], below 0 when another class's
    mean is nearer, and that nearest other class. Rows whose label has no mean (not among
    the candidates) get NaN and −1. Only classes of at least two candidates count as
    "another class": a mean of one sample is that sample."""
    n = len(labels)
    margin, nearer = np.full(n, np.nan), np.full(n, -1, dtype=np.int64)
    own = np.searchsorted(cm.labels, labels)
    known = (own < len(cm.labels)) & (cm.labels[np.minimum(own, len(cm.labels) - 1)] == labels)
    usable = cm.counts >= 2
    norms = (cm.means**2).sum(axis=1)
    chunk = max(1, CELLS // len(cm.labels))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = np.arange(start, stop)
        every = bool(known[start:stop].all())
        rows = rows if every else rows[known[rows]]
        if not len(rows):
            continue
        mine = q[start:stop] if every else q[rows]  # the same values, without a gather
        y = np.asarray(mine, dtype=np.float64) @ cm.whiten
        # ‖y‖² − 2·y·μ + ‖μ‖², in place: (−2·y·μ) + ‖y‖² is the same float as ‖y‖² − 2·y·μ
        d = y @ cm.means.T
        d *= -2.0
        d += np.square(y, out=y).sum(axis=1)[:, None]
        d += norms[None, :]
        np.maximum(d, 0.0, out=d)
        d_own = d[np.arange(len(rows)), own[rows]]
        # a class of one candidate: its mean is this row, at 0 whatever the products' last bits
        d_own = np.where(cm.counts[own[rows]] == 1, 0.0, d_own)
        d[np.arange(len(rows)), own[rows]] = np.inf
        d[:, ~usable] = np.inf
        other = d.argmin(axis=1)
        d_other = d[np.arange(len(rows)), other]
        with np.errstate(invalid="ignore", divide="ignore"):
            m = (d_other - d_own) / (d_other + d_own)
        m = np.where(np.isinf(d_other), 1.0, np.where(d_other + d_own > 0, m, 0.0))
        margin[rows] = m
        nearer[rows] = np.where(np.isinf(d_other), -1, cm.labels[other])
    return margin, nearer
