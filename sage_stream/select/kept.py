"""The bounded selection's write pass: each unit's kept rows and decisions, part by part.

Where it sits: bounded.select_units, once the cuts are found (or with --min-score), hands each
unit here: one scores part, or a batch of consecutive parts joined into one table
(batches.py, its column PART). The kept rows and every row's decision (decisions.py) are
computed for the whole unit at once and then cut into its parts, so that passes/select.py
writes selection.parquet and decisions.parquet shard by shard, as from one part at a time:
a part's kept rows sorted by shard then key, its decisions in its rows' order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .decisions import decide_part
from .dedup import Duplicates
from .orderings import recorded_score
from .parts import Rows, group_of
from .rules import OUTPUT_SCHEMA, PART


class Part(NamedTuple):
    """What the write pass returns for one part."""

    shard: str
    kept: pa.Table  # OUTPUT_SCHEMA rows, sorted by shard then key
    candidates: int
    decisions: pa.Table  # decisions.DECISION_SCHEMA, one row per scores row, in its order


class Unit(NamedTuple):
    """What the write pass returns for one unit: its parts, and all their decisions at once
    (the same rows, for a tally: one call per unit, not per part)."""

    parts: list[Part]
    decisions: pa.Table


class Cut(NamedTuple):
    """Per class (None: one group) the last kept row as (ordered value, key, shard), or "all"
    / "none"; and each class's cut value as decisions record it (bounded.Cuts.values)."""

    by_label: dict[int | None, tuple[int, str, str] | str]
    values: dict[int | None, float | None]


def kept_unit(
    table: pa.Table,
    rows: Rows,
    names: tuple[str, ...],
    *,
    cuts: Cut | None,
    min_score: float | None,
    scorer: str,
    duplicates: Duplicates | None = None,
) -> Unit:
    """The unit's kept rows as ``__key__, __shard__, label, score`` and its decisions, cut into
    its parts `names` (by PART where there are several). `table` is the unit as read, `rows`
    its candidates, ranked (parts.prepare)."""
    if min_score is not None:
        mask = rows.values >= min_score
    elif cuts is not None:
        mask = kept_mask(rows, cuts.by_label)
    else:
        raise ValueError("kept_unit needs cuts or min_score")  # a bug, not bad input
    idx = np.flatnonzero(mask)
    cand = rows.table.take(idx)
    score = recorded_score(rows.values[idx], scorer)
    columns = [cand["__key__"], cand["__shard__"], cand["label"], pa.array(score, pa.float64())]
    out = pa.Table.from_arrays(
        [c.cast(f.type) for c, f in zip(columns, OUTPUT_SCHEMA, strict=True)], schema=OUTPUT_SCHEMA
    )
    by = [("__shard__", "ascending"), ("__key__", "ascending")]
    many = len(names) > 1
    if many:  # sorted by part first: each part's rows stay together, in their own order
        out = out.append_column(PART, cand[PART])
        by = [(PART, "ascending"), *by]
    if out.num_rows > 1:
        out = out.take(pc.sort_indices(out, sort_keys=by))
    decided = decide_part(table, rows, mask, scorer=scorer, min_score=min_score,
                          cuts=None if cuts is None else cuts.values,
                          duplicates=duplicates)  # fmt: skip
    if not many:
        return Unit([Part(names[0], out, len(rows.values), decided)], decided)
    return Unit(_split(table, rows, out.drop_columns([PART]), decided, idx, names), decided)


def _split(table: pa.Table, rows: Rows, out: pa.Table, decided: pa.Table, idx: np.ndarray,
           names: tuple[str, ...]) -> list[Part]:  # fmt: skip
    """The unit's results cut into its parts (PART: each row's part in `names`)."""
    n = len(names)
    size = np.bincount(_ids(table), minlength=n)
    candidates = np.bincount(_ids(rows.table), minlength=n)
    kept = np.bincount(_ids(rows.table)[idx], minlength=n)
    start, first = np.cumsum(size) - size, np.cumsum(kept) - kept
    return [Part(name, out.slice(f, k), c, decided.slice(s, m)) for name, f, k, c, s, m in
            zip(names, first.tolist(), kept.tolist(), candidates.tolist(), start.tolist(),
                size.tolist(), strict=True)]  # fmt: skip


def _ids(table: pa.Table) -> np.ndarray:
    return table[PART].to_numpy(zero_copy_only=False)


def kept_mask(rows: Rows, cuts: dict[int | None, tuple[int, str, str] | str]) -> np.ndarray:
    """Boolean (n,): the rows ranked at or before their class's cut."""
    labels = list(cuts)
    group = group_of(rows, labels)
    g = np.maximum(group, 0)
    kinds = ("none", "all", "cut")  # as codes: a string array per row cost a compare per row
    kind = np.array([kinds.index(c if isinstance(c, str) else "cut") for c in cuts.values()],
                    dtype=np.int8)[g]  # fmt: skip
    value = np.array([0 if isinstance(c, str) else c[0] for c in cuts.values()],
                     dtype=np.uint64)  # fmt: skip
    known = group >= 0
    is_cut = known & (kind == 2)
    mask = known & (kind == 1) | is_cut & (rows.order > value[g])
    at = np.flatnonzero(is_cut & (rows.order == value[g]))
    if len(at):
        names = [("", "") if isinstance(c, str) else (c[1], c[2]) for c in cuts.values()]
        key = pa.array([names[i][0] for i in g[at].tolist()], pa.string())
        shard = pa.array([names[i][1] for i in g[at].tolist()], pa.string())
        keys, shards = rows.table["__key__"].take(at), rows.table["__shard__"].take(at)
        before = pc.or_(
            pc.less(keys, key), pc.and_(pc.equal(keys, key), pc.less_equal(shards, shard))
        )
        mask[at[np.asarray(before.to_numpy(zero_copy_only=False), dtype=bool)]] = True
    return mask
