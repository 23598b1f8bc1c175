"""Select in bounded memory: each class's exact cut found by passes over the score parts.

Where it sits: ``scores/part-<shard>.parquet`` → **bounded** → ``selection.parquet`` (written by
passes/select.py). It returns exactly the rows `reference.select` keeps on the whole table (the
reference, kept for tests), but never holds more than one part plus O(C·2^bits + M) numbers,
whatever N is:

    count   one pass: per class the candidates and the range of their ranking values
    search  radix passes: per class, a histogram of the next bits of the ranking value
            (mapped to an order-preserving uint64) over the rows still in play narrows the
            range that holds the class's quota-th best row; once the rows in play fit in
            ``memory_rows``, one pass collects them and sorts them in memory. Rows tied on
            the exact value are narrowed the same way by the bytes of their key
    write   one pass: per part, the rows ranked at or before their class's cut, and every
            row's decision (kept, or why not: decisions.py; kept.py)

A *cut* is a row position in the ranking (value descending, then key, then shard): a row is
kept iff it ranks at or before its class's cut. Every pass works on one part at a time and
returns a partial (counts, histograms, collected rows) that simply adds up, so the passes can
run shard-parallel (`map_parts`) and merge on the driver. A part is prepared (parts.py: its
candidates, checked, and their ranking values) once and kept for the later passes while the
prepared parts fit `PREPARED_BYTES`. The passes run over units (`select_units`): a part, or a
batch of consecutive parts joined into one table (batches.py), which every pass treats as one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import InputError
from .coverage import data_params
from .dedup import Duplicates
from .kept import Cut, Part, Unit, kept_unit
from .memo import TableMemo
from .orderings import recorded_score
from .parts import (
    Counts,
    MapParts,
    Rows,
    count_part,
    from_ordered_bits,
    group_of,
    key_bytes,
    prepare,
    stable_order,
)
from .quotas import class_quotas, overall_quota
from .rules import Rules

MEMORY_ROWS = 1 << 18  # rows collected at once to finish a search in memory
PREPARED_BYTES = 512 * 2**20  # prepared units kept across the passes (select_units)
MapRows = Callable[[Callable[[Rows], object], list[Any]], Iterable[object]]  # MapParts, prepared
HISTOGRAM_CELLS = 1 << 22  # classes × buckets of one radix pass (int64: 32 MiB)


# --- the search -------------------------------------------------------------------------------


@dataclass
class Search:
    """One class's search for its cut: the rows in play and the rank sought among them.

    In range mode the rows in play have ``low <= order <= high`` and ``rank`` counts from the
    highest value. In tie mode (``prefix`` set) they have ``order == low == high`` and a key
    starting with ``prefix`` (UTF-8 bytes), and ``rank`` counts by (key, shard) ascending.
    """

    label: int | None  # None: one group of every candidate (balance none)
    low: int
    high: int
    in_play: int
    rank: int  # 1-based
    prefix: bytes | None = None
    exact_key: bool = False  # tie mode: the key is exactly `prefix`; shards decide
    cut: tuple[int, str, str] | None = None  # (ordered value, key, shard) of the last kept row


@dataclass(frozen=True)
class Cuts:
    """Per class (or None for one group): the last kept row, ``"all"`` or ``"none"``."""

    by_label: dict[int | None, tuple[int, str, str] | str]
    scored: int
    lowest: dict[int | None, int] = dataclasses.field(default_factory=dict)  # ordered values

    def values(self, scorer: str) -> dict[int | None, float | None]:
        """Per class the ranking value of its last kept row, as selection.parquet records it
        (its lowest for "all", None for "none")."""
        out: dict[int | None, float | None] = {}
        for label, c in self.by_label.items():
            order = self.lowest.get(label) if c == "all" else None if c == "none" else c[0]
            if order is None:
                out[label] = None
                continue
            value = np.array([from_ordered_bits(order)])  # type: ignore[arg-type]
            out[label] = float(recorded_score(value, scorer)[0])
        return out


def _members(rows: Rows, searches: list[Search]) -> tuple[np.ndarray, np.ndarray]:
    """The rows in play: their indices and the position of their search, grouped by search."""
    group = group_of(rows, [s.label for s in searches])
    low = np.array([s.low for s in searches], dtype=np.uint64)
    high = np.array([s.high for s in searches], dtype=np.uint64)
    g = np.maximum(group, 0)
    mask = (group >= 0) & (rows.order >= low[g]) & (rows.order <= high[g])
    idx = np.flatnonzero(mask)
    idx = idx[stable_order(group[idx], len(searches))]
    gid = group[idx]
    if not any(s.prefix for s in searches) and not any(s.exact_key for s in searches):
        return idx, gid
    offsets, data = key_bytes(rows.table["__key__"])
    keep = np.ones(len(idx), dtype=bool)
    bounds = np.searchsorted(gid, np.arange(len(searches) + 1))
    for i, s in enumerate(searches):
        if not s.prefix and not s.exact_key:
            continue
        mine = slice(bounds[i], bounds[i + 1])
        start = offsets[idx[mine]]
        length = offsets[idx[mine] + 1] - start
        ok = length == len(s.prefix or b"") if s.exact_key else length >= len(s.prefix or b"")
        for j, byte in enumerate(s.prefix or b""):
            ok &= data[np.minimum(start + j, max(len(data) - 1, 0))] == byte
        keep[mine] = ok
    return idx[keep], gid[keep]


def _radix_shift(s: Search, bits: int) -> int:
    return max(0, (s.high - s.low).bit_length() - bits)


def radix_part(rows: Rows, searches: list[Search], bits: int) -> np.ndarray:
    """(len(searches), 2^bits) int64: per search, rows in play by their next `bits` bits."""
    idx, gid = _members(rows, searches)
    low = np.array([s.low for s in searches], dtype=np.uint64)
    shift = np.array([_radix_shift(s, bits) for s in searches], dtype=np.uint64)
    digit = ((rows.order[idx] - low[gid]) >> shift[gid]).astype(np.int64)
    cells = np.bincount(gid * (1 << bits) + digit, minlength=len(searches) << bits)
    return cells.reshape(len(searches), 1 << bits)


def tie_part(rows: Rows, searches: list[Search]) -> np.ndarray:
    """(len(searches), 257) int64: per tie search, rows in play by the key's next byte
    (0: the key ends there, b + 1: byte b)."""
    idx, gid = _members(rows, searches)
    offsets, data = key_bytes(rows.table["__key__"])
    depth = np.array([len(s.prefix or b"") for s in searches], dtype=np.int64)
    at = offsets[idx] + depth[gid]
    ended = at >= offsets[idx + 1]
    byte = np.where(ended, 0, data[np.minimum(at, len(data) - 1)].astype(np.int64) + 1)
    return np.bincount(gid * 257 + byte, minlength=len(searches) * 257).reshape(-1, 257)


def collect_part(rows: Rows, searches: list[Search]) -> list[list[tuple[int, str, str]]]:
    """Per search, the rows in play as (ordered value, key, shard)."""
    idx, gid = _members(rows, searches)
    keys = rows.table["__key__"].take(idx).to_pylist()
    shards = rows.table["__shard__"].take(idx).to_pylist()
    out: list[list[tuple[int, str, str]]] = [[] for _ in searches]
    for g, value, key, shard in zip(gid.tolist(), rows.order[idx].tolist(), keys, shards,
                                    strict=True):  # fmt: skip
        out[g].append((value, key, shard))
    return out


def _narrow_range(s: Search, hist: np.ndarray, bits: int) -> None:
    shift = _radix_shift(s, bits)
    above = 0
    for digit in range(len(hist) - 1, -1, -1):  # highest values first
        if above + hist[digit] >= s.rank:
            s.rank -= above
            s.in_play = int(hist[digit])
            s.low = s.low + (digit << shift)
            s.high = min(s.high, s.low + (1 << shift) - 1)
            return
        above += int(hist[digit])
    raise AssertionError("rank beyond the rows in play")  # a bug: counts are exact


def _narrow_tie(s: Search, hist: np.ndarray) -> None:
    below = 0
    for bucket in range(257):  # keys in ascending byte order; a key that ends sorts first
        if below + hist[bucket] >= s.rank:
            s.rank -= below
            s.in_play = int(hist[bucket])
            if bucket == 0:
                s.exact_key = True
            else:
                s.prefix = (s.prefix or b"") + bytes([bucket - 1])
            return
        below += int(hist[bucket])
    raise AssertionError("rank beyond the rows in play")


def _finish(s: Search, rows: list[tuple[int, str, str]]) -> None:
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))  # str order is UTF-8 byte order (code points)
    s.cut = rows[s.rank - 1]


def _searches(counts: Counts, keep: float, balance: str) -> dict[int | None, Search | str]:
    """Per group, a search for its cut, or "all" / "none" when the quota decides alone."""
    quotas: dict[int | None, int]
    sizes: dict[int | None, int]
    ranges: dict[int | None, tuple[int, int]]
    if balance == "none":
        quotas = {None: overall_quota(counts.total, keep)}
        sizes = {None: counts.total}
        ranges = {None: (counts.low_all or 0, counts.high_all or 0)}
    else:
        if counts.null_labels:
            raise InputError(
                f"{counts.null_labels} scored samples without a label: use --balance none"
            )
        quotas = {c: q for c, q in class_quotas(counts.n, keep, balance).items()}
        sizes = {c: n for c, n in counts.n.items()}
        ranges = {c: (counts.low[c], counts.high[c]) for c in counts.n}
    out: dict[int | None, Search | str] = {}
    for label, quota in quotas.items():
        if quota <= 0:
            out[label] = "none"
        elif quota >= sizes[label]:
            out[label] = "all"
        else:
            low, high = ranges[label]
            out[label] = Search(label, low, high, sizes[label], quota)
    return out


def find_cuts(
    names: list[Any],
    map_rows: MapRows,
    *,
    keep: float,
    balance: str,
    memory_rows: int = MEMORY_ROWS,
) -> Cuts:
    """Each class's cut for a `keep` fraction split by `balance` (see the module)."""
    counts = Counts()
    for got in map_rows(count_part, names):
        counts.add(got)  # type: ignore[arg-type]
    plan = _searches(counts, keep, balance)
    open_ = [s for s in plan.values() if isinstance(s, Search)]
    bits = max(4, min(16, int(math.log2(HISTOGRAM_CELLS / max(1, len(open_))))))
    while open_:
        _step(open_, names, map_rows, memory_rows, bits)
        open_ = [s for s in open_ if s.cut is None]
    cuts: dict[int | None, tuple[int, str, str] | str] = {}
    for label, s in plan.items():
        cuts[label] = s if isinstance(s, str) else s.cut  # type: ignore[assignment]
    lowest = {None: counts.low_all} if balance == "none" else dict(counts.low)
    return Cuts(cuts, counts.total, {k: v for k, v in lowest.items() if v is not None})


def _step(open_: list[Search], names: list[Any], map_rows: MapRows, memory_rows: int,
          bits: int) -> None:  # fmt: skip
    """One pass over the parts that moves every open search forward."""
    if sum(s.in_play for s in open_) <= memory_rows or all(s.exact_key for s in open_):
        found: list[list[tuple[int, str, str]]] = [[] for _ in open_]
        for got in map_rows(lambda r: collect_part(r, open_), names):
            for mine, rows in zip(found, got, strict=True):  # type: ignore[call-overload]
                mine.extend(rows)
        for s, rows in zip(open_, found, strict=True):
            _finish(s, rows)
        return
    ranged = [s for s in open_ if s.high > s.low]
    if ranged:
        total = np.zeros((len(ranged), 1 << bits), dtype=np.int64)
        for got in map_rows(lambda r: radix_part(r, ranged, bits), names):
            total += got  # type: ignore[arg-type]
        for s, hist in zip(ranged, total, strict=True):
            _narrow_range(s, hist, bits)
            if s.high == s.low and s.prefix is None:
                s.prefix = b""  # one value left: ties go by key from here
        return
    tied = [s for s in open_ if not s.exact_key]
    total = np.zeros((len(tied), 257), dtype=np.int64)
    for got in map_rows(lambda r: tie_part(r, tied), names):
        total += got  # type: ignore[arg-type]
    for s, hist in zip(tied, total, strict=True):
        _narrow_tie(s, hist)


# --- the driver -------------------------------------------------------------------------------


def select_units(
    units: list[Any],
    map_parts: MapParts,
    names_of: Callable[[Any], tuple[str, ...]],
    *,
    keep: float | None = None,
    balance: str = "proportional",
    min_score: float | None = None,
    scorer: str = "sage",
    seed: int = 0,
    memory_rows: int = MEMORY_ROWS,
    duplicates: Duplicates | None = None,
) -> Iterator[Unit]:
    """`select_parts` over units of parts in shard-name order (`names_of`: a unit's parts),
    each a part or a batch of them (batches.py): per unit, its parts' kept rows and decisions."""
    rules = Rules(keep, min_score, balance, scorer, seed)
    ready: Callable[[pa.Table], pa.Table] = lambda t: t  # noqa: E731
    mark = ready = duplicates.mark if duplicates is not None else ready  # near-copies go last
    scorer = rules.ranked_by  # with a threshold, sage-coverage's is on the agreement
    if scorer == "sage-coverage":  # its ranking needs data-wide numbers: passes first
        params = data_params(map_parts, units)  # (not of the near-copy marks)
        ready = params if duplicates is None else lambda t: params(mark(t))
    # each unit made ready and prepared (parts.prepare) once while the prepared units fit
    # PREPARED_BYTES: the search's passes and the write pass reuse them (memo.py)
    prepared = TableMemo(lambda t: prepare(ready(t), scorer, seed), _prepared_size,
                         PREPARED_BYTES)  # fmt: skip
    map_rows: MapRows = lambda fn, chosen: map_parts(lambda t: fn(prepared(t)), chosen)  # noqa: E731
    cut = None
    if keep is not None:
        cuts = find_cuts(units, map_rows, keep=keep, balance=balance, memory_rows=memory_rows)
        cut = Cut(cuts.by_label, cuts.values(scorer))
    for unit in units:  # one unit at a time: its names go with its table
        write = functools.partial(_write, prepared=prepared, names=names_of(unit), cuts=cut,
                                  min_score=min_score, scorer=scorer, duplicates=duplicates)  # fmt: skip
        yield from map_parts(write, [unit])  # type: ignore[misc]


def _prepared_size(table: pa.Table, rows: Rows) -> int:
    return table.nbytes + rows.table.nbytes + 24 * len(rows.values)  # + values, order, labels


def _write(
    table: pa.Table, prepared: TableMemo[Rows], names: tuple[str, ...], **kwargs: Any
) -> Unit:
    return kept_unit(table, prepared(table), names, **kwargs)


def select_parts(
    names: list[str],
    map_parts: MapParts,
    *,
    keep: float | None = None,
    balance: str = "proportional",
    min_score: float | None = None,
    scorer: str = "sage",
    seed: int = 0,
    memory_rows: int = MEMORY_ROWS,
    duplicates: Duplicates | None = None,
) -> Iterator[Part]:
    """For each part, in shard-name order: its kept rows, the rows `reference.select` keeps on
    all parts at once (same arguments), its candidates and its decisions. With `duplicates`
    (dedup.py, found over the same parts) every duplicate ranks after its class's others."""
    units = select_units(sorted(names), map_parts, lambda name: (name,), keep=keep,
                         balance=balance, min_score=min_score, scorer=scorer, seed=seed,
                         memory_rows=memory_rows, duplicates=duplicates)  # fmt: skip
    for unit in units:
        yield from unit.parts
