"""The selection's rules: what may be asked (scorer, balance, keep or min-score), checked once.

Where it sits: the edge (`Config`, the CLI, the API) and both selection paths (the in-memory
reference and the bounded one) ask this module whether a request is valid, so each rule and
its message live here only. `Rules` is one request, valid by construction.

Fractions are exact: ``keep`` is read as the shortest decimal that round-trips the float
(``0.3`` means 3/10), so ``0.3 · 10`` is exactly 3 and halves round up (``⌊x + ½⌋``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError

SCORERS = ("sage-coverage", "sage", "loss", "loss-easy", "grad-norm", "random")
SKETCHED = ("sage-coverage", "sage")  # the scorers that need pass 1's sketch
BALANCES = ("proportional", "equal", "none")
DEDUP = ("off", "on")  # near-copy removal (dedup.py), for any scorer

# The scores/ columns both selection paths read (sage-coverage reads `coverage` as well).
COLUMNS = ["__key__", "__shard__", "label", "status", "score", "loss", "grad_norm"]
PART = "_part"  # a batch's column: each row's part, by position in the batch (batches.py)
OUTPUT_SCHEMA = pa.schema(
    [
        ("__key__", pa.string()),
        ("__shard__", pa.string()),
        ("label", pa.int64()),
        ("score", pa.float64()),
    ]
)


@dataclass(frozen=True)
class Rules:
    """One selection request: exactly one of ``keep`` (a fraction in (0, 1], split over classes
    by ``balance``) or ``min_score`` (a threshold on the ranking value), the scorer and its
    seed. Checked on creation, so that both paths start from a valid request."""

    keep: float | None = None
    min_score: float | None = None
    balance: str = "proportional"
    scorer: str = "sage"
    seed: int = 0
    dedup: str = "off"

    def __post_init__(self) -> None:
        check_choice("scorer", self.scorer, SCORERS)
        check_choice("dedup", self.dedup, DEDUP)
        check_choice("balance", self.balance, BALANCES)
        if self.keep is None and self.min_score is None:
            raise InputError("say how much to keep: give exactly one of --keep F or --min-score T")
        check_amount(self.keep, self.min_score)

    @property
    def ranked_by(self) -> str:
        """The scorer whose values are ranked: with a threshold, sage-coverage's is on the
        agreement, as sage's (there is nothing left for coverage to decide)."""
        if self.scorer == "sage-coverage" and self.min_score is not None:
            return "sage"
        return self.scorer

    @property
    def dedups(self) -> bool:
        """Whether near-copies collapse to one (dedup.py) before the ranking."""
        return self.dedup == "on"

    def params(self) -> dict[str, object]:
        """The request as selection.parquet records it."""
        out: dict[str, object] = {"keep": self.keep, "balance": self.balance,
                                  "min_score": self.min_score, "scorer": self.scorer,
                                  "seed": self.seed}  # fmt: skip
        if self.dedups:  # recorded only when on: a selection without it reads as before
            out["dedup"] = True
        return out


def check_amount(keep: float | None, min_score: float | None) -> None:
    """At most one of keep and min_score, each valid when given (None: not given)."""
    if keep is not None and min_score is not None:
        raise InputError("give exactly one of --keep or --min-score, not both")
    if keep is not None:
        fraction(keep)
    if min_score is not None and (
        isinstance(min_score, bool)
        or not isinstance(min_score, numbers.Real)
        or not math.isfinite(min_score)
    ):
        raise InputError(f"--min-score must be a finite number, got {min_score!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"--{name} {value!r}: choose one of {', '.join(choices)}")


def fraction(keep: float) -> Fraction:
    """``keep`` as an exact fraction of its shortest decimal form, checked to be in (0, 1]."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
        raise InputError(f"--keep must be in (0, 1], got {keep!r}")
    return Fraction(repr(float(keep)))


def round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def check_columns(table: pa.Table, columns: tuple[str, ...] | list[str]) -> None:
    names = set(table.column_names)  # a new list per access: once, not once per column
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"scores table lacks column(s) {', '.join(missing)}")


def ok_mask(table: pa.Table) -> np.ndarray:
    """Boolean (n,): the candidates, the rows with ``status == "ok"``."""
    return pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False)
