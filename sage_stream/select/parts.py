"""One scores part, prepared for the bounded selection, and the count pass over the parts.

Where it sits: bounded.py passes over ``scores/part-<shard>.parquet`` one part at a time; each
pass first turns a part into its candidate `Rows` here (checked as reference.py checks the
whole table, ranked by orderings.py), and the first pass counts them per class (`Counts`).
`MapParts` is how a pass runs its per-part function over the parts: in this process
(`local_map`) or shard-parallel; partials add up on the driver.

Each part is one shard's rows (as pass 2 writes them), so a (shard, key) that occurs twice does
so within one part, where it is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from .classmeans import SIGNATURE, by_class
from .coverage import CAP_COLUMN as PARAMS
from .coverage import Filter, row_filter
from .dedup import DUPLICATE, demote
from .orderings import ranking_values
from .rules import COLUMNS, PART, check_columns, ok_mask

ReadPart = Callable[[str], pa.Table]  # shard name -> its scores part (the COLUMNS at least)
# Runs a per-part function over units of parts (shard names, or batches.py's batches of
# consecutive parts joined into one table): one result per unit, partials that add up.
MapParts = Callable[[Callable[[pa.Table], object], list[Any]], Iterable[object]]


def local_map(read: ReadPart) -> MapParts:
    """Run a per-part function over the parts in this process, one part in memory at a time."""

    def run(fn: Callable[[pa.Table], object], names: list[str]) -> Iterator[object]:
        return (fn(read(name)) for name in names)

    return run


# --- one part, prepared ------------------------------------------------------------------------


@dataclass
class Rows:
    """The candidate rows of one part: names, labels and ranking values."""

    table: pa.Table  # candidates only (status ok); once ranked, only KEPT_COLUMNS
    values: np.ndarray  # (n,) float64 ranking value
    order: np.ndarray  # (n,) uint64, same order as values (−0.0 and 0.0 equal)
    labels: np.ndarray | None  # (n,) int64, None when a label is null (checked by the caller)
    null_labels: int
    filter: Filter | None = None  # sage-coverage's, from the part's params: decisions reuse it


KEPT_COLUMNS = ("__key__", "__shard__", "label", PART, DUPLICATE)  # of the candidates, ranked


def prepare(table: pa.Table, scorer: str, seed: int) -> Rows:
    """One part's candidates, checked as `reference.select` checks the whole table."""
    check_columns(table, COLUMNS)
    if SIGNATURE in table.column_names and (
        scorer != "sage-coverage" or PARAMS in table.column_names
    ):
        table = table.drop_columns([SIGNATURE])  # used only by a ranking without its params
    ok = ok_mask(table)
    cand = table if ok.all() else table.filter(pa.array(ok))  # no copy when all are candidates
    for column in ("__key__", "__shard__"):
        if cand[column].null_count:
            raise InputError(
                f"scored rows must all have a {column!r}; {cand[column].null_count} are null"
            )
    _check_unique(cand)
    found = None  # sage-coverage's filter from the params columns: once for both uses
    if scorer == "sage-coverage" and PARAMS in cand.column_names:
        found = row_filter(cand, np.ones(cand.num_rows, dtype=bool))
    values = demote(cand, ranking_values(cand, scorer, seed, found))  # near-copies last
    if found is not None or scorer != "sage-coverage":  # all the later passes read of them
        cand = cand.select([c for c in cand.column_names if c in KEPT_COLUMNS])
    labels = cand["label"]
    nulls = labels.null_count
    as_int = None if nulls else labels.cast(pa.int64()).to_numpy(zero_copy_only=False)
    return Rows(cand, values, ordered_bits(values), as_int, nulls, found)


def ordered_bits(values: np.ndarray) -> np.ndarray:
    """float64 -> uint64 with the same order (``a < b`` iff ``bits(a) < bits(b)``), no NaN."""
    bits = (np.asarray(values, dtype=np.float64) + 0.0).view(np.uint64)  # + 0.0: −0.0 → 0.0
    negative = bits >> np.uint64(63) == 1
    return np.where(negative, ~bits, bits | np.uint64(1 << 63))


def from_ordered_bits(order: int) -> float:
    """The float64 whose `ordered_bits` is `order` (a cut's value, back from the search)."""
    bits = np.uint64(order)
    raw = bits & ~np.uint64(1 << 63) if bits >> np.uint64(63) == 1 else ~bits
    return float(np.array([raw], dtype=np.uint64).view(np.float64)[0])


def _check_unique(cand: pa.Table) -> None:
    if cand.num_rows < 2:
        return
    shards = cand["__shard__"]  # one shard per part as pass 2 writes it: its keys suffice
    one = pc.min_max(shards)
    if one["min"] == one["max"] and len(pc.unique(cand["__key__"])) == cand.num_rows:
        return
    names = pc.binary_join_element_wise(shards, cand["__key__"], "\0")
    if len(pc.unique(names)) == cand.num_rows:
        return
    if PART in cand.column_names:  # a batch: each part is checked alone, as if read alone
        ids = cand[PART].to_numpy(zero_copy_only=False)
        for part in np.unique(ids).tolist():
            _check_unique(cand.filter(pa.array(ids == part)).drop_columns([PART]))
        return
    order = pc.sort_indices(cand, sort_keys=[("__shard__", "ascending"), ("__key__", "ascending")])
    ranked = names.take(order).to_pylist()
    first = next(i for i in range(1, len(ranked)) if ranked[i] == ranked[i - 1])
    shard, key = ranked[first].split("\0", 1)
    raise InputError(
        f"shard {shard!r}, key {key!r}: scored more than once; rerun score for that shard"
    )


# --- the count pass -------------------------------------------------------------------------


@dataclass
class Counts:
    """What the count pass adds up over parts: per label, candidates and value range."""

    n: dict[int, int] = field(default_factory=dict)
    low: dict[int, int] = field(default_factory=dict)  # smallest ordered value
    high: dict[int, int] = field(default_factory=dict)
    null_labels: int = 0
    total: int = 0
    low_all: int | None = None
    high_all: int | None = None

    def add(self, other: Counts) -> None:
        for c, n in other.n.items():
            self.n[c] = self.n.get(c, 0) + n
            self.low[c] = min(self.low.get(c, other.low[c]), other.low[c])
            self.high[c] = max(self.high.get(c, other.high[c]), other.high[c])
        self.null_labels += other.null_labels
        self.total += other.total
        if other.low_all is not None and other.high_all is not None:
            first = self.low_all is None or self.high_all is None
            self.low_all = other.low_all if first else min(self.low_all, other.low_all)  # type: ignore[type-var]
            self.high_all = other.high_all if first else max(self.high_all, other.high_all)  # type: ignore[type-var]


def count_part(rows: Rows) -> Counts:
    out = Counts(null_labels=rows.null_labels, total=len(rows.values))
    if len(rows.values):
        out.low_all, out.high_all = int(rows.order.min()), int(rows.order.max())
    if rows.labels is not None and len(rows.labels):
        classes, inverse, sizes = by_class(rows.labels)
        order = rows.order[stable_order(inverse, len(classes))]
        starts = np.cumsum(sizes) - sizes
        low, high = np.minimum.reduceat(order, starts), np.maximum.reduceat(order, starts)
        for c, n, lo, hi in zip(classes.tolist(), sizes.tolist(), low.tolist(), high.tolist(),
                                strict=True):  # fmt: skip
            out.n[c], out.low[c], out.high[c] = n, lo, hi
    return out


# --- for the passes over the parts ---------------------------------------------------------


def stable_order(ids: np.ndarray, bound: int) -> np.ndarray:
    """`np.argsort(ids, kind="stable")` for ids in [0, bound): a radix sort where they fit 16
    bits (numpy sorts int64 by merging, four times slower); the same permutation."""
    return np.argsort(ids.astype(np.int16) if bound <= 1 << 15 else ids, kind="stable")


def group_of(rows: Rows, labels: list[int | None]) -> np.ndarray:
    """(n,) int64: for each row, the position in `labels` of its class, or -1."""
    n = len(rows.values)
    if labels == [None]:
        return np.zeros(n, dtype=np.int64)
    if rows.labels is None:
        raise InputError(f"{rows.null_labels} scored samples without a label: use --balance none")
    known = np.array(labels, dtype=np.int64)
    if len(known) and len(rows.labels) and min(known.min(), rows.labels.min()) >= 0:
        top = max(known.max(), rows.labels.max())
        if top < 1 << 20:  # small labels: a lookup table instead of a search per row
            lookup = np.full(top + 1, -1, dtype=np.int64)
            lookup[known[::-1]] = np.arange(len(known) - 1, -1, -1)  # the first of equals
            return lookup[rows.labels]
    sorter = np.argsort(known, kind="stable")
    pos = np.searchsorted(known, rows.labels, sorter=sorter)
    pos = np.minimum(pos, max(len(known) - 1, 0))
    found = sorter[pos] if len(known) else np.zeros(n, dtype=np.int64)
    hit = known[found] == rows.labels if len(known) else np.zeros(n, dtype=bool)
    return np.where(hit, found, -1)


def key_bytes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of a string column: (n + 1,) int64 offsets into a uint8 buffer."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arr.cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    buffer = arr.buffers()[2]
    data = np.frombuffer(buffer, dtype=np.uint8) if buffer is not None else np.zeros(1, np.uint8)
    return offsets, data
