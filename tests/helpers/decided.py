"""What each scores row's decision should be, computed directly on the whole table (for the
tests of select/decisions.py and of the decisions a run writes)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sage_stream.select import coverage
from sage_stream.select.orderings import ranking_values, recorded_score
from sage_stream.select.rules import ok_mask


def class_margin(table: pa.Table, ok: np.ndarray) -> np.ndarray | None:
    """sage-coverage's class margin per row, (d_other − d_own)/(d_other + d_own) in the
    Mahalanobis distance of the pooled within-class covariance of the candidates' signatures,
    computed directly in float64 (NaN where not a candidate); None where the rule does not
    apply (a candidate without a signature, or fewer than two classes)."""
    if "signature" not in table.column_names or table["signature"].filter(ok).null_count:
        return None
    y = pc.fill_null(table["label"], -1).to_numpy(zero_copy_only=False)[ok]
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        return None
    s = np.stack(table["signature"].filter(ok).to_numpy(zero_copy_only=False)).astype(np.float64)
    means = np.stack([s[y == c].mean(axis=0) for c in classes])
    r = s - means[np.searchsorted(classes, y)]
    cov = r.T @ r / (len(y) - len(classes))
    cov += coverage.classmeans.RIDGE * np.trace(cov) / len(cov) * np.eye(len(cov))
    diff = s[:, None] - means[None]
    d = np.einsum("nck,kl,ncl->nc", diff, np.linalg.inv(cov), diff)
    own = d[np.arange(len(y)), np.searchsorted(classes, y)]
    d[np.arange(len(y)), np.searchsorted(classes, y)] = np.inf
    d[:, counts < 2] = np.inf  # a class of one sample is not another class's mean
    other = d.min(axis=1)
    out = np.full(len(ok), np.nan)
    out[ok] = np.where(np.isinf(other), 1.0, (other - own) / (other + own))
    return out


def expected(table: pa.Table, kept: pa.Table, scorer: str, keep: float | None,
             min_score: float | None, balance: str = "proportional") -> list[tuple]:  # fmt: skip
    """Per row of `table` (decision, value, cut), computed on the whole table."""
    ok = ok_mask(table)
    values = recorded_score(ranking_values(table, scorer), scorer)
    labels = pc.fill_null(table["label"], -1).to_numpy(zero_copy_only=False)
    groups = np.zeros_like(labels) if balance == "none" else labels  # none: one group, one cut
    names = set(zip(kept["__shard__"].to_pylist(), kept["__key__"].to_pylist(), strict=True))
    is_kept = np.array([(s, k) in names for s, k in zip(table["__shard__"].to_pylist(),
                                                         table["__key__"].to_pylist(), strict=True)])  # fmt: skip
    sign = -1.0 if scorer == "loss-easy" else 1.0  # loss-easy keeps the lowest loss
    cut: dict[int, float | None] = {}
    for c in np.unique(groups[ok]).tolist():
        mine = values[ok & is_kept & (groups == c)] * sign
        cut[c] = float(mine.min() * sign) if len(mine) else None
    low = over = other = np.zeros(len(ok), dtype=bool)
    margin = class_margin(table, ok) if scorer == "sage-coverage" else None
    if scorer == "sage-coverage" and min_score is None and margin is not None:
        other = margin < 0  # nearer another class's mean: set aside
    elif scorer == "sage-coverage" and min_score is None:  # the filter, from its parameters
        p = coverage.params(coverage.part_sums(table, ok))
        score = table["score"].to_numpy(zero_copy_only=False)
        tau = table["coverage"].to_numpy(zero_copy_only=False)
        bins = np.clip(((score + 1.0) * 2048).astype(np.int64), 0, 4095)
        low = bins < np.array([p.cut.get(int(c), 0) for c in labels])
        over = tau > p.cap
    rows = []
    for i in range(table.num_rows):
        if not ok[i]:
            rows.append(("error", None, None))
            continue
        why = "min_score" if min_score is not None else "below_cut"
        why = ("kept" if is_kept[i] else "other_class" if other[i] else "agreement" if low[i]
               else "coverage" if over[i] else why)  # fmt: skip
        threshold = float(sign * min_score) if min_score is not None else cut[int(groups[i])]
        rows.append((why, float(values[i]), threshold))
    return rows
