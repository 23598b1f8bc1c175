"""Near-copies: within a class, candidates whose signatures nearly coincide collapse to one.

Where it sits: ``scores/`` (column ``signature``, pass 2: a 32-number projection of the head's
input h, sage_stream/signature.py) → **dedup** → the ranking (a duplicate ranks after every
other candidate of its class) and ``OUT/duplicates.parquet`` (each removed sample and the one
it duplicates). Selection then keeps a duplicate only when its class's quota is larger than
the class's distinct samples.

The rule. Two candidates i, j of class c are copies when

    ‖s_i − s_j‖² ≤ ε · 2 v_c,   v_c = mean over the class of ‖s − μ_c‖²

2 v_c is the mean squared distance between two samples of the class, so ε = `COPY_EPSILON`
(0.005) says "closer than 7% (√ε) of a typical pair". A relative threshold, because the scale
of h differs between models: a fixed cosine threshold that found every copy on one data set of
the quality benchmark merged a quarter of the other's distinct samples
(benchmarks/dedup_study.py). Groups are made greedily in (key, shard) order: a candidate joins
the nearest earlier representative within the threshold, else it becomes one; the
representative is the one kept first.

Bounded memory, whatever N: one pass over the parts sums each class's n, Σs and Σ‖s‖² (μ_c,
v_c); a class with more than `BUCKET_ROWS` candidates is split into 2^b buckets by the signs of
b fixed random directions of s − μ_c (a locality-sensitive hash), a count pass sizes them, and
buckets are compared in batches of at most `memory_rows` rows, one collect pass over the parts
per batch. Only rows of one bucket are ever compared, so a pair split by a hash plane is
missed: with b planes a pair at the threshold (angle ≈ √(2ε) ≈ 0.1 rad between the centred
signatures) is split with probability about 1 − (1 − 0.1/π)^b, 3% a plane; closer copies less.
Classes of at most BUCKET_ROWS candidates (the quality benchmark's) are compared exactly.
The duplicates found go to a local temporary Parquet file, one row group per batch, so
marking a part reads only that part's rows of it.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InputError
from .rules import ok_mask

if TYPE_CHECKING:
    from .parts import MapParts

COPY_EPSILON = 0.005  # squared distance below this share of a typical pair's: a copy
BUCKET_ROWS = 1 << 14  # a class above this many candidates is split into LSH buckets
MEMORY_ROWS = 1 << 18  # rows compared in one batch
HASH_SEED = 0xD0D0  # the bucket directions: fixed, so buckets do not depend on the run
DUPLICATE = "_duplicate"  # the column `mark` adds: the row duplicates an earlier candidate
DUPLICATES_SCHEMA = pa.schema(
    [
        ("__key__", pa.string()),
        ("__shard__", pa.string()),
        ("label", pa.int64()),
        ("duplicate_of_key", pa.string()),
        ("duplicate_of_shard", pa.string()),
    ]
)


def _candidates(table: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """A part's candidates, their labels (n,) and signatures (n, 32) float64."""
    if "signature" not in table.column_names:
        raise InputError("scores table lacks column 'signature': near-copy removal needs scores "
                         "made by this version (rerun `sage-stream score`)")  # fmt: skip
    cand = table.filter(pa.array(ok_mask(table)))
    sig = cand["signature"]
    if sig.null_count:
        raise InputError(
            f"{sig.null_count} scored samples have no near-copy signature (scores made with "
            "--grad params, or by an earlier version): use --dedup off, or rescore with "
            "--grad last-layer"
        )
    flat = pc.list_flatten(sig).to_numpy(zero_copy_only=False).astype(np.float64)
    labels = pc.fill_null(cand["label"], -1).to_numpy(zero_copy_only=False).astype(np.int64)
    if not cand.num_rows:  # a part of error rows only, or empty: reshape(0, -1) would fail
        width = sig.type.list_size if pa.types.is_fixed_size_list(sig.type) else 0
        return cand, labels, np.zeros((0, width))
    return cand, labels, flat.reshape(cand.num_rows, -1)


@dataclass
class ClassStats:
    """Per class: candidates, Σ s and Σ ‖s‖² (float64); partials of parts add up."""

    n: dict[int, int] = field(default_factory=dict)
    total: dict[int, np.ndarray] = field(default_factory=dict)
    square: dict[int, float] = field(default_factory=dict)

    def add(self, other: ClassStats) -> ClassStats:
        for c, n in other.n.items():
            self.n[c] = self.n.get(c, 0) + n
            self.total[c] = self.total.get(c, 0) + other.total[c]
            self.square[c] = self.square.get(c, 0.0) + other.square[c]
        return self

    def centre(self, c: int) -> np.ndarray:
        return self.total[c] / self.n[c]

    def threshold(self, c: int, epsilon: float) -> float:
        """ε · 2 v_c, v_c = E‖s‖² − ‖μ_c‖² (clamped at 0)."""
        mu = self.centre(c)
        return epsilon * 2.0 * max(self.square[c] / self.n[c] - float(mu @ mu), 0.0)


def stats_part(table: pa.Table) -> ClassStats:
    _, labels, sig = _candidates(table)
    out = ClassStats()
    for c in np.unique(labels).tolist():
        s = sig[labels == c]
        out.n[c], out.total[c], out.square[c] = len(s), s.sum(axis=0), float((s * s).sum())
    return out


def bucket_bits(n: int, bucket_rows: int = BUCKET_ROWS) -> int:
    """Hash planes for a class of n candidates: buckets of about `bucket_rows` rows (0: one)."""
    return 0 if n <= bucket_rows else math.ceil(math.log2(n / bucket_rows))


def _buckets(labels: np.ndarray, sig: np.ndarray, stats: ClassStats, bits: dict[int, int]):
    """(n,) int64 bucket of each row within its class: the sign bits of (s − μ_c)·r_j."""
    # imported here: only a class over BUCKET_ROWS needs it, and it imports torch
    from ..gradients.projection import sign_block

    planes = sign_block(HASH_SEED, 0, sig.shape[1], 16).astype(np.float64)  # (32, 16)
    out = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels).tolist():
        b = bits.get(c, 0)
        if b:
            rows = labels == c
            side = (sig[rows] - stats.centre(c)) @ planes[:, :b] > 0  # (m, b)
            out[rows] = side.astype(np.int64) @ (1 << np.arange(b, dtype=np.int64))
    return out


def _count_part(table: pa.Table, stats: ClassStats, bits: dict[int, int]) -> dict:
    _, labels, sig = _candidates(table)
    pairs = zip(labels.tolist(), _buckets(labels, sig, stats, bits).tolist(), strict=True)
    counts: dict[tuple[int, int], int] = {}
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def _batches(counts: dict[tuple[int, int], int], memory_rows: int) -> list[set]:
    """Buckets in (class, bucket) order, packed into batches of at most `memory_rows` rows
    (a bucket larger than that is a batch alone)."""
    out: list[set] = []
    rows = memory_rows + 1
    for bucket in sorted(counts):
        if rows + counts[bucket] > memory_rows:
            out.append(set())
            rows = 0
        out[-1].add(bucket)
        rows += counts[bucket]
    return out


def group(sig: np.ndarray, threshold: float) -> np.ndarray:
    """(m,) representative of each row, rows in their greedy order: a row joins the nearest
    earlier representative within `threshold` (squared distance), else it is one itself."""
    rep = np.arange(len(sig))
    reps: list[int] = []
    for i in range(len(sig)):
        if reps:
            d = ((sig[reps] - sig[i]) ** 2).sum(axis=1)
            j = int(np.argmin(d))
            if d[j] <= threshold:
                rep[i] = reps[j]
                continue
        reps.append(i)
    return rep


def _collect_part(table, stats: ClassStats, bits: dict[int, int], batch: set) -> pa.Table:  # noqa: ANN001
    cand, labels, sig = _candidates(table)
    buckets = _buckets(labels, sig, stats, bits)
    mine = np.array([(c, b) in batch for c, b in zip(labels.tolist(), buckets.tolist(),
                                                       strict=True)], dtype=bool)  # fmt: skip
    idx = np.flatnonzero(mine)
    return pa.table({
        "__key__": cand["__key__"].take(idx), "__shard__": cand["__shard__"].take(idx),
        "label": pa.array(labels[idx]), "bucket": pa.array(buckets[idx]),
        "sig": pa.FixedSizeListArray.from_arrays(pa.array(sig[idx].ravel()), sig.shape[1]),
    })  # fmt: skip


def _duplicates_of(rows: pa.Table, stats: ClassStats, epsilon: float) -> pa.Table:
    """The duplicates among one batch's rows, as DUPLICATES_SCHEMA rows sorted by shard, key."""
    order = pc.sort_indices(rows, sort_keys=[("label", "ascending"), ("bucket", "ascending"),
                                             ("__key__", "ascending"), ("__shard__", "ascending")])  # fmt: skip
    rows = rows.take(order)
    labels, buckets = rows["label"].to_numpy(), rows["bucket"].to_numpy()
    sig = pc.list_flatten(rows["sig"]).to_numpy().reshape(rows.num_rows, -1)
    starts = np.flatnonzero(
        np.r_[True, (labels[1:] != labels[:-1]) | (buckets[1:] != buckets[:-1])]
    )
    found, of = [], []
    for a, b in zip(starts.tolist(), [*starts[1:].tolist(), rows.num_rows], strict=True):
        rep = group(sig[a:b], stats.threshold(int(labels[a]), epsilon)) + a
        dup = np.flatnonzero(rep != np.arange(a, b)) + a
        found.append(dup)
        of.append(rep[dup - a])
    dup, rep = (np.concatenate(found), np.concatenate(of)) if found else (np.zeros(0, int),) * 2
    out = pa.table({
        "__key__": rows["__key__"].take(dup), "__shard__": rows["__shard__"].take(dup),
        "label": rows["label"].take(dup), "duplicate_of_key": rows["__key__"].take(rep),
        "duplicate_of_shard": rows["__shard__"].take(rep),
    }).cast(DUPLICATES_SCHEMA)  # fmt: skip
    return out.take(pc.sort_indices(out, sort_keys=[("__shard__", "ascending"),
                                                    ("__key__", "ascending")]))  # fmt: skip


def find_duplicates(
    names: list[str],
    map_parts: MapParts,
    *,
    epsilon: float = COPY_EPSILON,
    bucket_rows: int = BUCKET_ROWS,
    memory_rows: int = MEMORY_ROWS,
) -> Iterator[pa.Table]:
    """The duplicates, a table (DUPLICATES_SCHEMA) per batch of buckets (see the module)."""
    stats = ClassStats()
    for got in map_parts(stats_part, names):
        stats.add(got)  # type: ignore[arg-type]
    bits = {c: bucket_bits(n, bucket_rows) for c, n in stats.n.items()}
    if any(bits.values()):
        counts: dict[tuple[int, int], int] = {}
        for got in map_parts(lambda t: _count_part(t, stats, bits), names):
            for bucket, n in got.items():  # type: ignore[attr-defined]
                counts[bucket] = counts.get(bucket, 0) + n
    else:
        counts = {(c, 0): n for c, n in stats.n.items()}
    for batch in _batches(counts, memory_rows):
        collect = functools.partial(_collect_part, stats=stats, bits=bits, batch=batch)
        parts = list(map_parts(collect, names))
        rows = pa.concat_tables(parts) if parts else None
        if rows is not None and rows.num_rows:
            yield _duplicates_of(rows, stats, epsilon)


class Duplicates:
    """The duplicates found, in a local temporary Parquet file (one row group per batch), to
    mark each part's rows and to be copied into OUT. Close it (or use `with`) to remove it."""

    def __init__(self, batches: Iterator[pa.Table]):
        fd, self.path = tempfile.mkstemp(prefix="sage-duplicates-", suffix=".parquet")
        os.close(fd)
        self.count = 0
        with pq.ParquetWriter(self.path, DUPLICATES_SCHEMA) as writer:
            for table in batches:
                writer.write_table(table)
                self.count += table.num_rows

    def of_shard(self, shard: str) -> pa.Table:
        """This shard's duplicates (row-group statistics skip most of the file)."""
        return pq.read_table(self.path, filters=[("__shard__", "==", shard)])

    def mark(self, table: pa.Table) -> pa.Table:
        """The part with a boolean column DUPLICATE (one part is one shard's rows)."""
        shards = pc.unique(table["__shard__"]).to_pylist() if table.num_rows else []
        dup = np.zeros(table.num_rows, dtype=bool)
        for shard in shards:
            keys = self.of_shard(shard)["__key__"]
            hit = pc.and_(pc.equal(table["__shard__"], shard), pc.is_in(table["__key__"], keys))
            dup |= pc.fill_null(hit, False).to_numpy(zero_copy_only=False)
        return table.append_column(DUPLICATE, pa.array(dup))

    def tables(self) -> Iterator[pa.Table]:
        """The duplicates, a row group at a time (to copy them into OUT)."""
        f = pq.ParquetFile(self.path)
        for i in range(f.num_row_groups):
            yield f.read_row_group(i)

    def close(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)

    def __enter__(self) -> Duplicates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def demote(table: pa.Table, values: np.ndarray) -> np.ndarray:
    """Ranking values with the duplicates after every other candidate (−inf; ties by key)."""
    if DUPLICATE not in table.column_names:
        return values
    dup = table[DUPLICATE].to_numpy(zero_copy_only=False).astype(bool)
    return np.where(dup, -np.inf, values)
