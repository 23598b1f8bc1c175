"""Select: choose which scored samples to keep (DESIGN §3 "Select").

Where it sits: ``scores/`` (one row per input sample) → **select** → ``selection.parquet`` → emit.
This module is pure: it takes the scores as a ``pyarrow.Table`` and returns the kept rows; reading
and writing Parquet happens at the edges.

Only rows with ``status == "ok"`` are candidates; N is their number. Every ranking puts the
highest value first and breaks ties by ``__key__`` then ``__shard__`` (plain string order), so the
result depends only on the set of rows, never on their order in the input table.

Fractions are exact: ``keep`` is read as the shortest decimal that round-trips the float
(``0.3`` means 3/10), so ``0.3 · 10`` is exactly 3 and halves round up (``⌊x + ½⌋``).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sage_stream.coverage import coverage_ranking
from sage_stream.errors import InputError

SCORERS = ("sage-coverage", "sage", "loss", "loss-easy", "grad-norm", "random")
SKETCHED = ("sage-coverage", "sage")  # the scorers that need pass 1's sketch
BALANCES = ("proportional", "equal", "none")

# The scores/ column each scorer ranks by (random needs none: it hashes shard and key).
_SOURCE = {"sage": "score", "loss": "loss", "loss-easy": "loss", "grad-norm": "grad_norm"}
_REQUIRED = ("__key__", "__shard__", "label", "status", "score", "loss", "grad_norm")
OUTPUT_SCHEMA = pa.schema(
    [
        ("__key__", pa.string()),
        ("__shard__", pa.string()),
        ("label", pa.int64()),
        ("score", pa.float64()),
    ]
)


def ranking_values(table: pa.Table, scorer: str, seed: int = 0) -> np.ndarray:
    """Per-row ranking value (float64, shape ``(len(table),)``); higher is kept first.

    ``sage-coverage`` → agreement filters, ridge leverage draws (``coverage.coverage_ranking``);
    ``sage`` → score; ``loss`` → loss (hardest first); ``loss-easy`` → −loss; ``grad-norm`` →
    grad_norm; ``random`` → a value in [0, 1) from blake2b of ``f"{seed}\\0{shard}\\0{key}"``, so
    it depends neither on row order nor on which other rows exist. Rows that are not candidates
    may come back NaN; a candidate without the needed value is an InputError.
    """
    _check_choice("scorer", scorer, SCORERS)
    if scorer == "random":
        _check_columns(table, ("__key__", "__shard__"))
        return _random_values(table, seed)
    if scorer == "sage-coverage":
        _check_columns(table, ("status",))
        return coverage_ranking(table, _ok_mask(table), seed)
    column = _SOURCE[scorer]
    _check_columns(table, ("status", column))
    values = table[column].cast(pa.float64()).to_numpy(zero_copy_only=False)
    if np.isnan(values[_ok_mask(table)]).any():
        raise InputError(
            f"scorer {scorer!r} needs column {column!r} on every scored row; some are null or NaN"
        )
    return -values if scorer == "loss-easy" else values


def proportional_quotas(counts: dict[int, int], keep: float) -> dict[int, int]:
    """Per-class quotas that keep the class mix: largest-remainder rounding of ``keep · n_c``.

    Each class gets ``⌊f·n_c⌋``; the ``round_half_up(f·N) − Σ⌊f·n_c⌋`` units left go one each to
    the classes with the largest fractional part of ``f·n_c`` (ties: smaller label first). The
    total is exactly ``round_half_up(f·N)`` and no class gets more than it has.
    """
    f = _fraction(keep)
    exact = {c: f * n for c, n in counts.items()}
    quotas = {c: math.floor(x) for c, x in exact.items()}
    spare = _round_half_up(f * sum(counts.values())) - sum(quotas.values())
    for c in sorted(counts, key=lambda c: (quotas[c] - exact[c], c))[:spare]:
        quotas[c] += 1
    return quotas


def equal_quotas(counts: dict[int, int], keep: float) -> dict[int, int]:
    """Per-class quotas that give every class the same share, water-filling around small classes.

    With C classes the budget is ``T = C · ⌊f·N/C⌋``. Find the largest level L with
    ``Σ_c min(n_c, L) ≤ T``; class c gets ``min(n_c, L)`` (a class smaller than L gives all of
    its samples), then the ``T − Σ_c min(n_c, L)`` units left (fewer than the classes with
    ``n_c > L``) go one each to the classes with ``n_c > L``, smallest label first. The total is
    exactly T; it can be below ``round(f·N)`` (by less than C) because each class's base share is
    floored.
    """
    f = _fraction(keep)
    if not counts:
        return {}
    budget = len(counts) * math.floor(f * sum(counts.values()) / len(counts))
    # Walk classes from smallest: each one that fits under the current fair share gives all.
    left, open_classes, level = budget, len(counts), None
    for n in sorted(counts.values()):
        if n > left // open_classes:
            level = left // open_classes
            break
        left, open_classes = left - n, open_classes - 1
    if level is None:  # every class fits: the budget is all samples
        return dict(counts)
    quotas = {c: min(n, level) for c, n in counts.items()}
    spare = budget - sum(quotas.values())
    for c in sorted(c for c, n in counts.items() if n > level)[:spare]:
        quotas[c] += 1
    return quotas


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
    _check_args(keep, balance, min_score, scorer)
    _check_columns(table, _REQUIRED)
    cand = table.filter(pa.array(_ok_mask(table)))
    if scorer == "sage-coverage" and min_score is not None:
        scorer = "sage"
    values = ranking_values(cand, scorer, seed)  # (N,)
    key_rank, shard_rank = _string_rank(cand, "__key__"), _string_rank(cand, "__shard__")
    by_name = np.lexsort((key_rank, shard_rank))  # (N,) output order: shard, then key
    _check_unique(cand, by_name, key_rank, shard_rank)
    if min_score is not None:
        kept = values >= min_score
    else:
        kept = _top_mask(cand, values, key_rank, shard_rank, keep, balance)
    rows = by_name[kept[by_name]]
    score = -values if scorer == "loss-easy" else values
    columns = [
        cand["__key__"].take(rows),
        cand["__shard__"].take(rows),
        cand["label"].take(rows),
        pa.array(score[rows], pa.float64()),
    ]
    return pa.Table.from_arrays(
        [c.cast(f.type) for c, f in zip(columns, OUTPUT_SCHEMA, strict=True)], schema=OUTPUT_SCHEMA
    )


def _top_mask(cand, values, key_rank, shard_rank, keep, balance) -> np.ndarray:
    """Boolean (N,): the top ``quota[class]`` rows of each class (one class for balance none)."""
    if balance == "none":
        group = np.zeros(len(values), dtype=np.int64)
        quota = np.array([_round_half_up(_fraction(keep) * len(values))])
    else:
        labels = cand["label"]
        if labels.null_count:
            raise InputError(
                f"{labels.null_count} scored samples without a label: use --balance none"
            )
        classes, group, counts = np.unique(
            labels.cast(pa.int64()).to_numpy(), return_inverse=True, return_counts=True
        )
        quota_of = proportional_quotas if balance == "proportional" else equal_quotas
        quotas = quota_of(dict(zip(classes.tolist(), counts.tolist(), strict=True)), keep)
        quota = np.array([quotas[c] for c in classes.tolist()], dtype=np.int64)
    order = np.lexsort((shard_rank, key_rank, -values, group))  # class, best first, then names
    sorted_group = group[order]
    start = np.searchsorted(sorted_group, np.arange(len(quota)))  # (C,) first row of each class
    mask = np.zeros(len(values), dtype=bool)
    mask[order] = np.arange(len(order)) - start[sorted_group] < quota[sorted_group]
    return mask


def _random_values(table: pa.Table, seed: int) -> np.ndarray:
    # One hash per row is the price of order independence; 53 bits give exact floats in [0, 1).
    pairs = zip(table["__shard__"].to_pylist(), table["__key__"].to_pylist(), strict=True)
    digests = b"".join(
        hashlib.blake2b(f"{seed}\0{shard}\0{key}".encode(), digest_size=8).digest()
        for shard, key in pairs
    )
    bits = np.frombuffer(digests, dtype=">u8").astype(np.uint64)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _ok_mask(table: pa.Table) -> np.ndarray:
    return pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False)


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


def _check_args(keep, balance, min_score, scorer) -> None:
    _check_choice("scorer", scorer, SCORERS)
    _check_choice("balance", balance, BALANCES)
    if (keep is None) == (min_score is None):
        raise InputError("give exactly one of --keep or --min-score")
    if keep is not None:
        _fraction(keep)
    elif (
        isinstance(min_score, bool)
        or not isinstance(min_score, numbers.Real)
        or math.isnan(min_score)
    ):
        raise InputError(f"--min-score must be a number, got {min_score!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown --{name} {value!r}; choose one of {', '.join(choices)}")


def _check_columns(table: pa.Table, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"scores table lacks column(s) {', '.join(missing)}")


def _fraction(keep: float) -> Fraction:
    """``keep`` as an exact fraction of its shortest decimal form, checked to be in (0, 1]."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
        raise InputError(f"--keep must be a fraction in (0, 1], got {keep!r}")
    return Fraction(repr(float(keep)))


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))
