"""What the seeded draws (`random`, `sage-coverage`) are keyed by: a sample's content.

Where it sits: `orderings.random_values` and `coverage.gumbel_noise` turn the 64 bits given
here into a draw. A row with a content digest (scores/ column `digest`, pass 2's
`batches.content_digest` of the decoded input and label) is drawn by it, so the same samples
get the same draw whether they came as tar or Parquet, with or without a key column, in any
shards. A row without one (scores written before the column existed, or a sample that did not
decode, which is never drawn) keeps the draw it had before: blake2b of the seed and its key
(and shard, for random).

The digest is already a uniform 64-bit hash, so its draw is a SplitMix64 finaliser of the
digest mixed with the seed, in numpy over the whole column: one row costs nanoseconds, where a
Python hash per row cost microseconds and was most of a select's time (docs/benchmarks.md §8).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DIGEST = "digest"


def draw_bits(table: pa.Table, seed: int, domain: str, with_shard: bool) -> np.ndarray:
    """64 uniform bits per row (uint64), a function of the seed, `domain` (one per scorer, so
    that two draws with the same seed are independent) and the row's digest, else its key."""
    n = table.num_rows
    if DIGEST in table.column_names:
        column = table[DIGEST]
        has = pc.is_valid(column).to_numpy(zero_copy_only=False)
        digests = pc.fill_null(column, 0).to_numpy(zero_copy_only=False).view(np.uint64)
    else:
        has, digests = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.uint64)
    bits = _splitmix(digests ^ _seed_bits(domain, seed))
    if not has.all():  # the earlier draw, by key
        rows = np.flatnonzero(~has)
        keys = table["__key__"].take(pa.array(rows)).to_pylist()
        if with_shard:
            shards = table["__shard__"].take(pa.array(rows)).to_pylist()
            keys = [f"{s}\0{k}" for s, k in zip(shards, keys, strict=True)]
        bits[rows] = _blake_bits([f"{_legacy(domain, seed)}{k}" for k in keys])
    return bits


def _seed_bits(domain: str, seed: int) -> np.uint64:
    return _blake_bits([f"{domain}\0{seed}\0digest"])[0]


def _legacy(domain: str, seed: int) -> str:
    """The prefix the key-based draw hashed before the digest existed (kept for old parts)."""
    return f"{seed}\0" if domain == "random" else f"{domain}\0{seed}\0"


def _blake_bits(ids: list[str]) -> np.ndarray:
    out = b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(out, dtype=">u8").astype(np.uint64)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea and Flood 2014), elementwise; uint64 wraps."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def unit_floats(bits: np.ndarray) -> np.ndarray:
    """[0, 1) from the top 53 bits: exact float64s."""
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
