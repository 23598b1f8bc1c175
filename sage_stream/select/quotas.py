"""Class quotas: how a ``keep`` budget is shared between classes (``--balance``).

Where it sits: both selection paths (reference.py in memory, bounded.py over the score parts)
count the candidates of each class, ask here how many of each to keep, and keep that many
from the top of each class's ranking. Totals are exact (rules.fraction, rules.round_half_up).
"""

from __future__ import annotations

import math

from .rules import fraction, round_half_up


def overall_quota(total: int, keep: float) -> int:
    """``--balance none``: one group of every candidate, ``round_half_up(f·N)`` kept."""
    return round_half_up(fraction(keep) * total)


def class_quotas(counts: dict[int, int], keep: float, balance: str) -> dict[int, int]:
    """Per-class quotas for ``--balance proportional`` or ``equal``."""
    quota_of = proportional_quotas if balance == "proportional" else equal_quotas
    return quota_of(counts, keep)


def proportional_quotas(counts: dict[int, int], keep: float) -> dict[int, int]:
    """Per-class quotas that keep the class mix: largest-remainder rounding of ``keep · n_c``.

    Each class gets ``⌊f·n_c⌋``; the ``round_half_up(f·N) − Σ⌊f·n_c⌋`` units left go one each to
    the classes with the largest fractional part of ``f·n_c`` (ties: smaller label first). The
    total is exactly ``round_half_up(f·N)`` and no class gets more than it has.
    """
    f = fraction(keep)
    exact = {c: f * n for c, n in counts.items()}
    quotas = {c: math.floor(x) for c, x in exact.items()}
    spare = round_half_up(f * sum(counts.values())) - sum(quotas.values())
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
    f = fraction(keep)
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
