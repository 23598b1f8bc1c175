"""The `sage-coverage` ranking: the likely-mislabelled set aside, a seeded draw among the rest.

Where it sits: pass 2 records each sample's signature (32 numbers of h, the head's input),
agreement (``score``) and ridge leverage τ (``coverage``; scores.ridge_leverage); selection
ranks the candidates by them here, for both paths (reference.py, bounded.py).

The rule (issue 28's third round, docs/quality.md). A candidate whose signature is nearer
another class's mean than its own class's, in the Mahalanobis distance of the pooled
within-class covariance (classmeans.py), is set aside as likely mislabelled (decision
``other_class``), after every passing one, by its class margin; the others are drawn uniformly
by Efraimidis–Spirakis keys of Gumbel noise hashed from the seed and the row's content, so the
draw does not depend on row order or sharding. A proxy trained on noisy labels learns many of
the flipped labels, but h keeps them with their true class.

Without signatures (`--grad params`, older scores), with one class (unlabeled data), or when
more than `MAX_SET_ASIDE` of the candidates would be set aside, the rule before applies: a
candidate passes when its agreement is not among the lowest `FILTER_QUANTILE` of its class's and
its τ is at most `SUPPORT` times the mean τ (unless more than `MAX_CAPPED_SHARE` of its class is
over the cap), and the passing are drawn with probability ∝ (τ/‖g‖²)^(1/T), the leverage of the
gradient's direction; the others follow by agreement.

With `--dedup on`, near-copies go last first (dedup.py). The data-wide parameters come from
passes over the score parts (`data_params`), in memory of one part plus a few numbers per
class, so every part is ranked by a function of its own rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from . import classmeans
from .content import draw_bits
from .memo import TableMemo
from .rules import PART, ok_mask

log = logging.getLogger("sage_stream")

# The rule without signatures, chosen on benchmarks/quality.py (docs/quality.md).
FILTER_QUANTILE = 0.05  # per class, at most this share of lowest agreement goes last
SUPPORT = 1.0  # τ above SUPPORT × mean τ: unsupported, goes last
TEMPERATURE = 3.0  # T in w^(1/T), w = τ/‖g‖²: 1 draws in proportion to w; inf: uniform
MAX_CAPPED_SHARE = 1.0  # a class more than this over the τ cap is exempt (1.0: none; 0.5 lost)


def gumbel_noise(table: pa.Table, seed: int) -> np.ndarray:
    """Standard Gumbel noise per row, (N,), from the row's 64 draw bits (`content.draw_bits`: its
    content digest, else its key). Never of the shard or the key when the digest is there, so
    the same samples stored as tar or Parquet, keyed or not, get the same draw."""
    bits = draw_bits(table, seed, "coverage", with_shard=False)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1), never 0 or 1
    return -np.log(-np.log(u))


AGREEMENT_BINS = 4096  # the agreement filter's cut is found to 2/4096 of [−1, 1]
CAP_COLUMN, CUT_COLUMN, EXEMPT_COLUMN = "_coverage_cap", "_agreement_cut", "_cap_exempt"
MARGIN_COLUMN, NEARER_COLUMN = "_class_margin", "_nearer_class"  # with class means only
MEMO_BYTES = 256 * 2**20  # parts with their class margins kept across the selection's passes
# Over this share of candidates nearer another class's mean: signatures that do not separate the
# classes (hundreds in 32 numbers), the rule without them applies (quality pools: <= 30%).
MAX_SET_ASIDE = 0.5


@dataclass
class CoverageSums:
    """What the parameters need from the parts; partials of disjoint parts add up."""

    tau_sum: int = 0  # Σ τ in units of 2^-32 (integers: exact, the same in any order)
    n: int = 0
    hist: dict[int, np.ndarray] = field(default_factory=dict)  # label -> (AGREEMENT_BINS,)
    top: float = 0.0  # max |signature| over the candidates (classmeans.largest)
    signed: bool = True  # every candidate has a signature: the class-mean rule applies

    def add(self, other: CoverageSums) -> CoverageSums:
        self.tau_sum += other.tau_sum
        self.n += other.n
        self.top = max(self.top, other.top)
        self.signed = self.signed and other.signed
        for label, h in other.hist.items():
            self.hist[label] = self.hist.get(label, 0) + h
        return self


def _columns(table: pa.Table, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    names = set(table.column_names)
    missing = [c for c in ("score", "coverage", "label", "grad_norm", "loss") if c not in names]
    if missing:
        raise InputError(
            f"scores table lacks column(s) {', '.join(missing)}: --scorer sage-coverage needs "
            "scores made by this version with a sketch (rerun `sage-stream score`)"
        )
    score = table["score"].cast(pa.float64()).to_numpy(zero_copy_only=False)
    tau = table["coverage"].cast(pa.float64()).to_numpy(zero_copy_only=False)
    if np.isnan(score[ok]).any() or np.isnan(tau[ok]).any():
        raise InputError(
            "--scorer sage-coverage needs a SAGE score and a coverage on every scored row; "
            "some are null (scores made without a sketch?)"
        )
    labels = pc.fill_null(table["label"], -1).to_numpy(zero_copy_only=False)
    return score, tau, labels


def _fixed_sum(tau: np.ndarray) -> int:
    """Σ τ in units of 2^-32, each τ clipped to [0, 2^24] (far above any cap): an integer sum,
    so that a whole table and its parts in any order give the same cap. Summed as high and low
    32 bits, so that numpy's int64 cannot overflow (parts of fewer than 2^31 rows)."""
    fixed = np.round(np.clip(tau, 0.0, 2.0**24) * 2.0**32).astype(np.int64)
    return (int((fixed >> 32).sum()) << 32) + int((fixed & 0xFFFFFFFF).sum())


def _bins(score: np.ndarray) -> np.ndarray:
    return np.clip(((score + 1.0) * (AGREEMENT_BINS / 2)).astype(np.int64), 0, AGREEMENT_BINS - 1)


def part_sums(table: pa.Table, ok: np.ndarray) -> CoverageSums:
    """One part's contribution: Σ τ, the candidates, per class a histogram of agreement, and
    the largest |signature| (or that some candidate has none)."""
    score, tau, labels = _columns(table, ok)
    top = classmeans.top(table, ok)  # None: a candidate has no signature
    out = CoverageSums(_fixed_sum(tau[ok]), int(ok.sum()), top=top or 0.0, signed=top is not None)
    classes, inverse, _ = classmeans.by_class(labels[ok])  # one histogram per class, at once
    cells = np.bincount(inverse * AGREEMENT_BINS + _bins(score[ok]),
                        minlength=len(classes) * AGREEMENT_BINS)  # fmt: skip
    out.hist = dict(zip(classes.tolist(), cells.reshape(len(classes), AGREEMENT_BINS), strict=True))
    return out


@dataclass(frozen=True)
class Params:
    """The ranking's data-wide parameters: the class means (None without signatures: then the
    rule before), the τ cap, per class the lowest passing bin, and the classes exempt from the
    cap (more than MAX_CAPPED_SHARE of them over it)."""

    cap: float
    cut: dict[int, int]
    exempt: frozenset[int] = frozenset()
    means: classmeans.ClassMeans | None = None
    top: float = 0.0  # the signatures' fixed-point scale (classmeans.fixed)


def params(
    got: CoverageSums, quantile: float = FILTER_QUANTILE, support: float = SUPPORT
) -> Params:
    """cap = support · mean τ; a class's cut is the agreement bin of its ⌊q·n_c⌋-th lowest row
    (0-based): rows in that bin or above pass, so at most a share q of the class is filtered."""
    cap = support * (got.tau_sum / got.n) * 2.0**-32 if got.n else 0.0
    cut = {}
    for label, h in got.hist.items():
        below = math.floor(quantile * int(h.sum()))
        cut[label] = int(np.searchsorted(np.cumsum(h), below, side="right"))
    return Params(cap, cut, top=got.top)


def capped_counts(table: pa.Table, ok: np.ndarray, cap: float) -> dict[int, int]:
    """Per class, the candidates whose τ is over the cap (the second pass's partial)."""
    _, tau, labels = _columns(table, ok)
    over = labels[ok & (tau > cap)]
    return {int(c): int(n) for c, n in zip(*np.unique(over, return_counts=True), strict=True)}


def _signed(table: pa.Table, ok: np.ndarray, top: float) -> np.ndarray:
    """The candidates' fixed-point signatures (the first parameter pass found them on all)."""
    if (q := classmeans.fixed_candidates(table, ok, top)) is None:
        raise InputError("a scores part lost its signatures between the selection's passes")
    return q


def mean_sums(table: pa.Table, ok: np.ndarray, top: float) -> classmeans.MeanSums:
    """A part's fixed-point signature sums (the second pass's other partial)."""
    labels = pc.fill_null(table["label"], -1).to_numpy(zero_copy_only=False)
    return classmeans.part_sums(_signed(table, ok, top), labels[ok])


def with_exempt(p: Params, got: CoverageSums, capped: dict[int, int],
                share: float = MAX_CAPPED_SHARE, means: classmeans.MeanSums | None = None) -> Params:  # fmt: skip
    """`p` with the classes more than `share` of whose candidates are over the cap, and the
    class means of `means` (the second pass's sums, when every candidate is signed)."""
    exempt = frozenset(c for c, h in got.hist.items()
                       if capped.get(c, 0) > share * int(h.sum()))  # fmt: skip
    found = classmeans.class_means(means) if means is not None else None
    return Params(p.cap, p.cut, exempt, found, p.top)


def _per_label(labels: np.ndarray, values: dict[int, int], default: int) -> np.ndarray:
    """values[label] per row (default where absent), by one lookup over the distinct labels."""
    distinct, inverse, _ = classmeans.by_class(labels)
    lookup = np.array([values.get(int(c), default) for c in distinct.tolist()], dtype=np.int64)
    return lookup[inverse] if len(labels) else np.zeros(0, dtype=np.int64)


def with_params(table: pa.Table, p: Params) -> pa.Table:
    """The part with the parameters as columns, so that the ranking is a function of the row."""
    labels = pc.fill_null(table["label"], -1).to_numpy(zero_copy_only=False)
    cut, exempt = _per_label(labels, p.cut, 0), _per_label(labels, dict.fromkeys(p.exempt, 1), 0)
    exempt = exempt.astype(bool)
    table = table.append_column(CAP_COLUMN, pa.array(np.full(len(labels), p.cap)))
    table = table.append_column(EXEMPT_COLUMN, pa.array(exempt))
    if p.means is not None:
        margin, nearer = _class_margins(table, p.means, p.top, labels)
        table = table.append_column(MARGIN_COLUMN, pa.array(margin))
        table = table.append_column(NEARER_COLUMN, pa.array(nearer))
    return table.append_column(CUT_COLUMN, pa.array(cut))


def _class_margins(table: pa.Table, means: classmeans.ClassMeans, top: float,
                   labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Each row's class margin and nearest other class (classmeans); NaN and −1 off candidates.
    Part by part in a batch (batches.py): a product's last bits depend on its rows."""
    ok = ok_mask(table)
    margin, nearer = np.full(len(ok), np.nan), np.full(len(ok), -1, dtype=np.int64)
    q, at, own = _signed(table, ok, top), np.flatnonzero(ok), labels[ok]
    ids = table[PART].to_numpy()[ok] if PART in table.column_names else np.zeros(len(at))
    bounds = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), len(at)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        margin[at[a:b]], nearer[at[a:b]] = classmeans.class_margin(means, q[a:b], own[a:b])
    return margin, nearer


def data_params(map_parts: Any, names: list[Any]) -> Callable[[pa.Table], pa.Table]:
    """A part -> the part with the parameters (`with_params`), found first by passes of
    `map_parts` (parts.py) over the parts: memory is one part plus a histogram per class."""
    got = CoverageSums()
    for one in map_parts(lambda t: part_sums(t, ok_mask(t)), names):
        got.add(one)
    first = params(got)
    capped: dict[int, int] = {}
    means = classmeans.MeanSums() if got.signed else None

    def second(t: pa.Table) -> tuple[dict[int, int], classmeans.MeanSums | None]:
        ok = ok_mask(t)
        return capped_counts(t, ok, first.cap), mean_sums(t, ok, got.top) if got.signed else None

    for counts, sums in map_parts(second, names):
        for c, n in counts.items():
            capped[c] = capped.get(c, 0) + n
        if means is not None and sums is not None:
            means.add(sums)
    p = with_exempt(first, got, capped, means=means)
    ready = _prepared(p)
    if p.means is not None:  # the margins are kept (memo): the ranking reuses them
        kept = _separating(p, sum(map_parts(lambda t: _flagged(ready(t)), names)), got.n)
        ready = ready if kept is p else _prepared(kept)
    return ready


def _flagged(table: pa.Table) -> int:
    """Rows of a `with_params` part nearer another class's mean (0 without class means)."""
    if MARGIN_COLUMN not in table.column_names:
        return 0
    return int((table[MARGIN_COLUMN].to_numpy(zero_copy_only=False) < 0).sum())  # NaN: no


def _separating(p: Params, flagged: int, n: int) -> Params:
    """`p` without class means if more than MAX_SET_ASIDE of the n candidates are flagged."""
    if p.means is None or flagged <= MAX_SET_ASIDE * n:
        return p
    log.warning("sage-coverage: %d of %d candidates (%.0f%%) lie nearer another class's mean "
                "than their own: their signatures do not separate the classes, so the agreement "
                "and coverage filter is used instead", flagged, n, 100.0 * flagged / n)  # fmt: skip
    return Params(p.cap, p.cut, p.exempt, None, p.top)


def _prepared(p: Params) -> TableMemo[pa.Table]:
    """`with_params` of each part, kept while the parts with their class margins (the cost)
    fit `MEMO_BYTES`; nothing is kept without class means. An entry counts its whole table:
    it pins the part (memo.py)."""
    budget = MEMO_BYTES if p.means is not None else -1
    return TableMemo(lambda t: with_params(t, p), lambda _, out: out.nbytes, budget)


# The filter's side of each row's decision (select/decisions.py): why a row is set aside (a
# decision, and how inspect says it: fields of the scores row and the decision row, by name),
# the numbers recorded for every candidate (decision columns, NaN → null): FILTER_COLUMNS are
# the same for a whole class (in the per-class summary too), ROW_COLUMNS differ by row.
SET_ASIDE = {
    "other_class": "its signature is nearer the mean of class {nearer_class:.0f} than its own "
    "class's (class margin {class_margin:.6g} < 0): likely mislabelled",
    "agreement": "agreement {score:.6g} below its class's agreement cut {agreement_cut:.6g}",
    "coverage": "coverage τ {coverage:.6g} over the cap {coverage_cap:.6g}",
}
REASONS = ("", *SET_ASIDE)  # a Filter's codes: 0 passes, else the reason's place here
FILTER_COLUMNS = ("agreement_cut", "coverage_cap")
ROW_COLUMNS = ("class_margin", "nearer_class")


@dataclass(frozen=True)
class Filter:
    """The filter, row by row: why a row is set aside, if it is, and the numbers that decide."""

    codes: np.ndarray  # (n,) int8: 0 where the row passes, else its reason's place in REASONS
    numbers: dict[str, np.ndarray]  # FILTER_COLUMNS and ROW_COLUMNS -> (n,) float64, NaN: none
    by_class_means: bool  # the class-mean rule (else the rule without signatures)

    @property
    def passes(self) -> np.ndarray:
        return self.codes == 0

    def set_aside(self, reason: str) -> np.ndarray:
        """(n,) bool: the rows set aside for `reason` (a key of SET_ASIDE)."""
        return self.codes == REASONS.index(reason)


def _with_own_params(
    table: pa.Table, ok: np.ndarray, quantile: float, support: float, capped_share: float
) -> pa.Table:
    """`with_params` of this table's own parameters (the in-memory path, or a test's table)."""
    got = part_sums(table, ok)
    p = params(got, quantile, support)
    means = mean_sums(table, ok, got.top) if got.signed and ok.any() else None
    p = with_exempt(p, got, capped_counts(table, ok, p.cap), capped_share, means)
    ready = with_params(table, p)
    kept = _separating(p, _flagged(ready), got.n)
    return ready if kept is p else with_params(table, kept)


def row_filter(
    table: pa.Table,
    ok: np.ndarray,
    quantile: float = FILTER_QUANTILE,
    support: float = SUPPORT,
    capped_share: float = MAX_CAPPED_SHARE,
) -> Filter:
    """Each row's filter: parameters from the columns `with_params` adds (a part of a bigger
    table), else from this table itself (quantile, support and capped_share are used only
    then, by the rule without signatures)."""
    score, tau, labels = _columns(table, ok)
    if CAP_COLUMN not in table.column_names:
        table = _with_own_params(table, ok, quantile, support, capped_share)
    n = len(score)
    nan = np.full(n, np.nan)
    if MARGIN_COLUMN in table.column_names:  # the class-mean rule
        margin = table[MARGIN_COLUMN].to_numpy(zero_copy_only=False)
        nearer = table[NEARER_COLUMN].to_numpy(zero_copy_only=False).astype(np.float64)
        reasons = np.where(margin < 0, REASONS.index("other_class"), 0).astype(np.int8)
        numbers = {"agreement_cut": nan, "coverage_cap": nan, "class_margin": margin,
                   "nearer_class": np.where(nearer < 0, np.nan, nearer)}  # fmt: skip
        return Filter(reasons, numbers, True)
    cap = table[CAP_COLUMN].to_numpy(zero_copy_only=False)
    cut = table[CUT_COLUMN].to_numpy(zero_copy_only=False)
    exempt = table[EXEMPT_COLUMN].to_numpy(zero_copy_only=False).astype(bool)
    low = ~(_bins(score) >= cut)
    over = ~(tau <= cap) & ~exempt
    agreement, coverage = REASONS.index("agreement"), REASONS.index("coverage")
    reasons = np.where(low, agreement, np.where(over, coverage, 0)).astype(np.int8)
    edge = cut.astype(np.float64) / (AGREEMENT_BINS / 2) - 1.0  # bin b starts at b/2048 − 1
    cap = np.where(exempt, np.nan, cap)  # an exempt class has no cap
    numbers = {"agreement_cut": edge, "coverage_cap": cap, "class_margin": nan,
               "nearer_class": nan}  # fmt: skip
    return Filter(reasons, numbers, False)


def coverage_ranking(
    table: pa.Table,
    ok: np.ndarray,
    seed: int = 0,
    *,
    quantile: float = FILTER_QUANTILE,
    support: float = SUPPORT,
    temperature: float = TEMPERATURE,
    capped_share: float = MAX_CAPPED_SHARE,
    found: Filter | None = None,
) -> np.ndarray:
    """Ranking value per row (float64, higher kept first) for `--scorer sage-coverage`.

    Rows that pass get 3 + k/(1 + |k|) ∈ (2, 4), k their draw's key: Gumbel noise (the
    class-mean rule: a uniform draw), or log(τ/‖g‖²)/T + Gumbel (the rule without signatures);
    the map keeps the order and bounds the range. Rows set aside come after every passing
    one: by their class margin ∈ [−1, 0), or by their agreement ∈ [−1, 1]. Rows not in `ok`
    come back NaN. The filter is `row_filter`'s (`found`, where the caller has it already).
    """
    score, tau, _ = _columns(table, ok)
    found = found or row_filter(table, ok, quantile, support, capped_share)
    noise = gumbel_noise(table, seed)  # by content (content.py)
    if found.by_class_means:
        key, failed = noise, found.numbers["class_margin"]
    else:
        norm = table["grad_norm"].cast(pa.float64()).to_numpy(zero_copy_only=False)
        with np.errstate(divide="ignore", invalid="ignore"):  # τ = 0: −inf, last of the passing
            weight = np.log(np.clip(tau, 0.0, None)) - 2.0 * np.log(norm)  # log(τ/‖g‖²)
        key = noise if np.isinf(temperature) else weight / temperature + noise
        failed = score
    finite = np.where(np.isfinite(key), key, 0.0)
    bounded = np.where(np.isneginf(key), 2.0, 3.0 + finite / (1.0 + np.abs(finite)))
    values = np.where(found.passes, bounded, failed)
    return np.where(ok, values, np.nan)
