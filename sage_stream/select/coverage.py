"""The `sage-coverage` ranking: agreement and ridge leverage set the likely-wrong aside, the
leverage of each gradient's direction draws among the rest.

Where it sits: pass 2 records each sample's agreement (``score``) and its ridge leverage
τ_i = g_iᵀ (BᵀB + λI)⁻¹ g_i (``coverage``; scores.ridge_leverage says how and why); selection
ranks the candidates by them here, for both paths (reference.py, bounded.py).

A switch measured and left off (issue 28): rank a pool easy first (as `loss-easy`) when more
than `NOISY_SHARE` of its candidates are *unfit*, their proxy loss above `UNFIT_LOSS`. With
the quality benchmark's proxies (300 full-batch steps, near-memorising) it told noisy pools
(44-54% unfit) from clean ones (at most 11%) and led under label noise; with the digits proxy
trained 20 steps (test accuracy 0.87), 35% of a clean pool is unfit, the switch fires, and easy
first fell 0.04-0.06 below random on clean data, where this rule is level with it
(docs/quality.md). `NOISY_SHARE` = 1.0 keeps it off: no pool is called noisy.

Select (`--scorer sage-coverage`): agreement and leverage say which samples are
likely wrong, a seeded draw weighted by the leverage of each gradient's direction picks among
the rest. τ ranges
from ≈ 0 (one of many near-copies, or a sample the proxy already fits) to ≈ 1 (a sample no other
sample supports); a mislabelled sample sits near the top, its large gradient pulling towards
another class. So a candidate *passes* when its agreement is not among the lowest
`FILTER_QUANTILE` of its class's and its τ is at most `SUPPORT` times the mean τ of all
candidates, unless its class is exempt from the cap: a class more than `MAX_CAPPED_SHARE` of
whose candidates are over the cap (1.0, the default: none; 0.5 would keep a rare or hard class
from being set aside whole, but did not win on the benchmark). The passing samples are drawn
without replacement, with probability proportional to w_i^(1/T), w_i = τ_i/‖g_i‖² the leverage
of the gradient's direction, by Efraimidis–Spirakis keys in log form: log(w)/T + Gumbel noise
hashed from the seed and key, so the draw is deterministic and independent of row order
(`TEMPERATURE` = ∞: a uniform draw). The samples that fail come after every passing one, by
agreement. With `--dedup on`, near-copies go last first (dedup.py). The data-wide parameters
(whether the pool is noisy, the τ cap, each class's agreement cut, the exempt classes) come from
two passes over the score parts (`with_data_params`), in memory of one part plus a histogram per
class, so selection stays bounded (bounded.py) and every part is ranked by a function of its own
rows. selection.parquet's `score` is the ranking value (in a noisy pool 3 − loss/(1 + loss)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from .content import draw_bits
from .rules import ok_mask

# Chosen on benchmarks/quality.py (docs/quality.md): see there for the other values tried.
FILTER_QUANTILE = 0.05  # per class, at most this share of lowest agreement goes last
SUPPORT = 1.0  # τ above SUPPORT × mean τ: unsupported, goes last
TEMPERATURE = 3.0  # T in w^(1/T), w = τ/‖g‖²: 1 draws in proportion to w; inf: uniform
# A class with more than this share of its candidates over the τ cap is exempt from it. 1.0:
# none is (the default: 0.5, measured together with --dedup on and a uniform draw, lost to this
# setting on the digits; docs/quality.md).
MAX_CAPPED_SHARE = 1.0
# Noisy labels (issue 28, benchmarks/quality_rank.py): more than NOISY_SHARE of the candidates
# with a loss above UNFIT_LOSS (nats), and the pool is ranked easy first. 1.0: never (the
# default; 0.25 fires on clean pools when the proxy is less fitted, see the module docstring).
UNFIT_LOSS = 0.05
NOISY_SHARE = 1.0


def gumbel_noise(table: pa.Table, seed: int) -> np.ndarray:
    """Standard Gumbel noise per row, (N,), from the row's 64 draw bits (`content.draw_bits`: its
    content digest, else its key). Never of the shard or the key when the digest is there, so
    the same samples stored as tar or Parquet, keyed or not, get the same draw."""
    bits = draw_bits(table, seed, "coverage", with_shard=False)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1), never 0 or 1
    return -np.log(-np.log(u))


AGREEMENT_BINS = 4096  # the agreement filter's cut is found to 2/4096 of [−1, 1]
CAP_COLUMN, CUT_COLUMN = "_coverage_cap", "_agreement_cut"  # added by `with_params`
EXEMPT_COLUMN, NOISY_COLUMN = "_cap_exempt", "_noisy"


@dataclass
class CoverageSums:
    """What the parameters need from the parts; partials of disjoint parts add up."""

    tau_sum: int = 0  # Σ τ in units of 2^-32 (integers: exact, the same in any order)
    n: int = 0
    unfit: int = 0  # candidates whose loss is above UNFIT_LOSS
    hist: dict[int, np.ndarray] = field(default_factory=dict)  # label -> (AGREEMENT_BINS,)

    def add(self, other: CoverageSums) -> CoverageSums:
        self.tau_sum += other.tau_sum
        self.n += other.n
        self.unfit += other.unfit
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


def _loss(table: pa.Table, ok: np.ndarray) -> np.ndarray:
    loss = table["loss"].cast(pa.float64()).to_numpy(zero_copy_only=False)
    if np.isnan(loss[ok]).any():
        raise InputError("--scorer sage-coverage needs a loss on every scored row; some are null")
    return loss


def _fixed_sum(tau: np.ndarray) -> int:
    """Σ τ in units of 2^-32, each τ clipped to [0, 2^24] (far above any cap): an integer sum,
    so that a whole table and its parts in any order give the same cap. Chunks of 64 rows keep
    numpy's int64 from overflowing (64 · 2^56 < 2^63)."""
    fixed = np.round(np.clip(tau, 0.0, 2.0**24) * 2.0**32).astype(np.int64)
    if not len(fixed):
        return 0
    return sum(int(x) for x in np.add.reduceat(fixed, np.arange(0, len(fixed), 64)))


def _bins(score: np.ndarray) -> np.ndarray:
    return np.clip(((score + 1.0) * (AGREEMENT_BINS / 2)).astype(np.int64), 0, AGREEMENT_BINS - 1)


def part_sums(table: pa.Table, ok: np.ndarray) -> CoverageSums:
    """One part's contribution: Σ τ, the candidates, the unfit ones, and per class a histogram
    of agreement."""
    score, tau, labels = _columns(table, ok)
    unfit = int((_loss(table, ok)[ok] > UNFIT_LOSS).sum())
    out = CoverageSums(_fixed_sum(tau[ok]), int(ok.sum()), unfit)
    bins = _bins(score[ok])
    for label in np.unique(labels[ok]).tolist():
        members = labels[ok] == label
        out.hist[label] = np.bincount(bins[members], minlength=AGREEMENT_BINS)
    return out


@dataclass(frozen=True)
class Params:
    """The ranking's data-wide parameters: the τ cap, per class the lowest passing bin, and the
    classes exempt from the cap (more than MAX_CAPPED_SHARE of them over it: a rare or hard
    class, not a mislabelled few, so it is never set aside whole)."""

    cap: float
    cut: dict[int, int]
    exempt: frozenset[int] = frozenset()
    noisy: bool = False  # more than NOISY_SHARE of the candidates unfit: easy first


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
    return Params(cap, cut, noisy=is_noisy(got.unfit, got.n))


def is_noisy(unfit: int, n: int, share: float | None = None) -> bool:
    """More than `share` (default `NOISY_SHARE`, read at the call) of the n candidates unfit
    (exact: integers and one product)."""
    return unfit > (NOISY_SHARE if share is None else share) * n


def capped_counts(table: pa.Table, ok: np.ndarray, cap: float) -> dict[int, int]:
    """Per class, the candidates whose τ is over the cap (the second pass's partial)."""
    _, tau, labels = _columns(table, ok)
    over = labels[ok & (tau > cap)]
    return {int(c): int(n) for c, n in zip(*np.unique(over, return_counts=True), strict=True)}


def with_exempt(
    p: Params, got: CoverageSums, capped: dict[int, int], share: float = MAX_CAPPED_SHARE
) -> Params:
    """`p` with the classes more than `share` of whose candidates are over the cap."""
    exempt = frozenset(c for c, h in got.hist.items()
                       if capped.get(c, 0) > share * int(h.sum()))  # fmt: skip
    return Params(p.cap, p.cut, exempt, p.noisy)


def _per_label(labels: np.ndarray, values: dict[int, int], default: int) -> np.ndarray:
    """values[label] per row (default where absent), by one lookup over the distinct labels."""
    distinct, inverse = np.unique(labels, return_inverse=True)
    lookup = np.array([values.get(int(c), default) for c in distinct.tolist()], dtype=np.int64)
    return lookup[inverse.reshape(-1)] if len(labels) else np.zeros(0, dtype=np.int64)


def with_params(table: pa.Table, p: Params) -> pa.Table:
    """The part with the parameters as columns, so that the ranking is a function of the row."""
    labels = pc.fill_null(table["label"], -1).to_numpy(zero_copy_only=False)
    cut, exempt = _per_label(labels, p.cut, 0), _per_label(labels, dict.fromkeys(p.exempt, 1), 0)
    exempt = exempt.astype(bool)
    table = table.append_column(CAP_COLUMN, pa.array(np.full(len(labels), p.cap)))
    table = table.append_column(EXEMPT_COLUMN, pa.array(exempt))
    table = table.append_column(NOISY_COLUMN, pa.array(np.full(len(labels), p.noisy)))
    return table.append_column(CUT_COLUMN, pa.array(cut))


def with_data_params(map_parts: Any, names: list[str]) -> Any:
    """A MapParts (parts.py) whose parts carry the parameters, found first by one pass of
    `map_parts` over the parts: memory is one part plus a histogram per class."""
    got = CoverageSums()
    for one in map_parts(lambda t: part_sums(t, ok_mask(t)), names):
        got.add(one)
    first = params(got)
    capped: dict[int, int] = {}
    for counts in map_parts(lambda t: capped_counts(t, ok_mask(t), first.cap), names):
        for c, n in counts.items():
            capped[c] = capped.get(c, 0) + n
    found = with_exempt(first, got, capped)
    return lambda fn, chosen: map_parts(lambda t: fn(with_params(t, found)), chosen)


# The filter's side of each row's decision (select/decisions.py): why a row is set aside (a
# decision, and how inspect says it: fields of the scores row and the decision row, by name),
# and the numbers recorded for every candidate (decision columns, NaN → null).
SET_ASIDE = {
    "agreement": "agreement {score:.6g} below its class's agreement cut {agreement_cut:.6g}",
    "coverage": "coverage τ {coverage:.6g} over the cap {coverage_cap:.6g}",
}
FILTER_COLUMNS = ("agreement_cut", "coverage_cap")


@dataclass(frozen=True)
class Filter:
    """The filter, row by row: why a row is set aside, if it is, and the numbers that decide."""

    reasons: np.ndarray  # (n,) str: "" where the row passes, else a key of SET_ASIDE
    numbers: dict[str, np.ndarray]  # FILTER_COLUMNS -> (n,) float64, NaN where none
    noisy: np.ndarray  # (n,) bool: the pool is noisy, ranked easy first, nothing set aside

    @property
    def passes(self) -> np.ndarray:
        return self.reasons == ""


def row_filter(
    table: pa.Table,
    ok: np.ndarray,
    quantile: float = FILTER_QUANTILE,
    support: float = SUPPORT,
    capped_share: float = MAX_CAPPED_SHARE,
    noisy_share: float | None = None,
) -> Filter:
    """Each row's filter: parameters from the columns `with_params` adds (a part of a bigger
    table), else from this table itself (quantile, support, capped_share and noisy_share are
    used only then). In a noisy pool no row is set aside and the numbers are NaN."""
    score, tau, labels = _columns(table, ok)
    if CAP_COLUMN in table.column_names:
        cap = table[CAP_COLUMN].to_numpy(zero_copy_only=False)
        cut = table[CUT_COLUMN].to_numpy(zero_copy_only=False)
        exempt = table[EXEMPT_COLUMN].to_numpy(zero_copy_only=False).astype(bool)
        noisy = table[NOISY_COLUMN].to_numpy(zero_copy_only=False).astype(bool)
    else:
        got = part_sums(table, ok)
        p = params(got, quantile, support)
        p = with_exempt(p, got, capped_counts(table, ok, p.cap), capped_share)
        cap = np.full(len(score), p.cap)
        cut = _per_label(labels, p.cut, 0)
        exempt = _per_label(labels, dict.fromkeys(p.exempt, 1), 0).astype(bool)
        noisy = np.full(len(score), is_noisy(got.unfit, got.n, noisy_share))
    low = ~(_bins(score) >= cut) & ~noisy
    over = ~(tau <= cap) & ~exempt & ~noisy
    reasons = np.where(low, "agreement", np.where(over, "coverage", ""))
    edge = cut.astype(np.float64) / (AGREEMENT_BINS / 2) - 1.0  # bin b starts at b/2048 − 1
    edge = np.where(noisy, np.nan, edge)  # a noisy pool has no filter
    cap = np.where(exempt | noisy, np.nan, cap)  # an exempt class has no cap
    return Filter(reasons, {"agreement_cut": edge, "coverage_cap": cap}, noisy)


def coverage_ranking(
    table: pa.Table,
    ok: np.ndarray,
    seed: int = 0,
    *,
    quantile: float = FILTER_QUANTILE,
    support: float = SUPPORT,
    temperature: float = TEMPERATURE,
    capped_share: float = MAX_CAPPED_SHARE,
    noisy_share: float | None = None,
) -> np.ndarray:
    """Ranking value per row (float64, higher kept first) for `--scorer sage-coverage`.

    In a noisy pool every row gets 3 − loss/(1 + loss) ∈ (2, 3]: easy first. Otherwise rows
    that pass get 3 + k/(1 + |k|) ∈ (2, 4) with k = log(τ/‖g‖²)/T + Gumbel (their class's
    weighted draw; the map keeps the order and bounds the range); rows that fail get their
    agreement ∈ [−1, 1], after every passing row. Rows not in `ok` come back NaN. The filter
    is `row_filter`'s.
    """
    score, tau, _ = _columns(table, ok)
    found = row_filter(table, ok, quantile, support, capped_share, noisy_share)
    passes = found.passes
    noise = gumbel_noise(table, seed)  # by content (content.py)
    norm = table["grad_norm"].cast(pa.float64()).to_numpy(zero_copy_only=False)
    with np.errstate(divide="ignore", invalid="ignore"):  # τ = 0: −inf, drawn last of the passing
        weight = np.log(np.clip(tau, 0.0, None)) - 2.0 * np.log(norm)  # log(τ/‖g‖²)
    key = noise if np.isinf(temperature) else weight / temperature + noise
    finite = np.where(np.isfinite(key), key, 0.0)
    bounded = np.where(np.isneginf(key), 2.0, 3.0 + finite / (1.0 + np.abs(finite)))
    values = np.where(passes, bounded, score)
    loss = _loss(table, ok)
    with np.errstate(invalid="ignore"):  # rows not in ok may have no loss
        easy_first = 3.0 - loss / (1.0 + loss)
    values = np.where(found.noisy, easy_first, values)
    return np.where(ok, values, np.nan)
