"""Select in memory: the reference that the bounded path (bounded.py) must equal, row for row.

Where it sits: ``scores/`` (one row per input sample) → **select** → ``selection.parquet`` → emit.
This module is pure: it takes the scores as a ``pyarrow.Table`` and returns the kept rows; reading
and writing Parquet happens at the edges. It holds every candidate at once, so the stage itself
selects with bounded.py; this one is kept for tests, benchmarks and small tables.

Only rows with ``status == "ok"`` are candidates; N is their number. Every ranking puts the
highest value first and breaks ties by ``__key__`` then ``__shard__`` (plain string order), so the
result depends only on the set of rows, never on their order in the input table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from .orderings import ranking_values, recorded_score
from .quotas import class_quotas, overall_quota
from .rules import COLUMNS, OUTPUT_SCHEMA, Rules, check_columns, ok_mask


def select(
    table: pa.Table,
    *,
    keep: float | None = None,
    balance: str = "proportional",
    min_score: float | None = None,
    scorer: str = "sage",
    seed: int = 0,
) -> pa.Table:
    """The kept candidates as ``__key__, __shard__, label, score``, sorted by shard then key.

    Give exactly one of ``keep`` (fraction in (0, 1], split over classes by ``balance``) or
    ``min_score`` (keep every candidate whose ranking value is ≥ it; ``balance`` is ignored;
    for ``sage-coverage`` the threshold is on the agreement, as for ``sage``: with a threshold
    there is nothing left for coverage to decide). ``score`` is the value ranked on: the score,
    the loss (also for ``loss-easy``), grad_norm, the random value, or sage-coverage's key.
    """
    rules = Rules(keep, min_score, balance, scorer, seed)
    check_columns(table, COLUMNS)
    cand = table.filter(pa.array(ok_mask(table)))
    values = ranking_values(cand, rules.ranked_by, seed)  # (N,)
    key_rank, shard_rank = _string_rank(cand, "__key__"), _string_rank(cand, "__shard__")
    by_name = np.lexsort((key_rank, shard_rank))  # (N,) output order: shard, then key
    _check_unique(cand, by_name, key_rank, shard_rank)
    if min_score is not None:
        kept = values >= min_score
    else:
        kept = _top_mask(cand, values, key_rank, shard_rank, rules)
    rows = by_name[kept[by_name]]
    score = recorded_score(values, rules.ranked_by)
    columns = [
        cand["__key__"].take(rows),
        cand["__shard__"].take(rows),
        cand["label"].take(rows),
        pa.array(score[rows], pa.float64()),
    ]
    return pa.Table.from_arrays(
        [c.cast(f.type) for c, f in zip(columns, OUTPUT_SCHEMA, strict=True)], schema=OUTPUT_SCHEMA
    )


def _top_mask(cand, values, key_rank, shard_rank, rules: Rules) -> np.ndarray:
    """Boolean (N,): the top ``quota[class]`` rows of each class (one class for balance none)."""
    assert rules.keep is not None  # a threshold has no quotas (the caller's branch)
    if rules.balance == "none":
        group = np.zeros(len(values), dtype=np.int64)
        quota = np.array([overall_quota(len(values), rules.keep)])
    else:
        labels = cand["label"]
        if labels.null_count:
            raise InputError(
                f"{labels.null_count} scored samples without a label: use --balance none"
            )
        classes, group, counts = np.unique(
            labels.cast(pa.int64()).to_numpy(), return_inverse=True, return_counts=True
        )
        counted = dict(zip(classes.tolist(), counts.tolist(), strict=True))
        quotas = class_quotas(counted, rules.keep, rules.balance)
        quota = np.array([quotas[c] for c in classes.tolist()], dtype=np.int64)
    order = np.lexsort((shard_rank, key_rank, -values, group))  # class, best first, then names
    sorted_group = group[order]
    start = np.searchsorted(sorted_group, np.arange(len(quota)))  # (C,) first row of each class
    mask = np.zeros(len(values), dtype=bool)
    mask[order] = np.arange(len(order)) - start[sorted_group] < quota[sorted_group]
    return mask


def _string_rank(table: pa.Table, column: str) -> np.ndarray:
    """Dense rank of a string column in byte (= code point) order, for fast numeric sorting."""
    if table[column].null_count:
        raise InputError(
            f"scored rows must all have a {column!r}; {table[column].null_count} are null"
        )
    return pc.rank(table[column], sort_keys="ascending", tiebreaker="dense").to_numpy()


def _check_unique(cand: pa.Table, by_name: np.ndarray, key_rank, shard_rank) -> None:
    # A duplicate (shard, key) would make the tie-break, and emit, ambiguous.
    same = (key_rank[by_name[1:]] == key_rank[by_name[:-1]]) & (
        shard_rank[by_name[1:]] == shard_rank[by_name[:-1]]
    )
    if same.any():
        row = int(by_name[1:][same][0])
        shard, key = cand["__shard__"][row].as_py(), cand["__key__"][row].as_py()
        raise InputError(
            f"shard {shard!r}, key {key!r}: scored more than once; rerun score for that shard"
        )
