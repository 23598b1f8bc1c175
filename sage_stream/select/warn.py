"""The selection's warnings: a run that will select, but whose choice may say little.

Where it sits: the select step (passes/select.py) asks here before it selects. No
--checkpoint, or scores with almost no spread (an untrained proxy gives every sample nearly the
same agreement; the report's zoomed histograms would make it look like a real separation). The
warnings go to the log, the selection's record, the manifest and the report; none changes which
samples are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from .rules import SKETCHED

FLAT_SPREAD = 0.01  # scores whose standard deviation is below this tell samples apart poorly


class Spread:
    """Streaming count, mean, variance (Welford, merged per part), min and max of scores."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.low, self.high = math.inf, -math.inf

    def add(self, scores: pa.ChunkedArray | pa.Array) -> None:
        values = scores.drop_null()
        n = len(values)
        if not n:
            return
        mean = float(pc.mean(values).as_py())
        m2 = float(pc.variance(values, ddof=0).as_py()) * n
        delta, total = mean - self.mean, self.n + n
        self.m2 += m2 + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n = total
        lo, hi = pc.min_max(values).values()
        self.low, self.high = min(self.low, lo.as_py()), max(self.high, hi.as_py())

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 0.0


def run_warnings(
    scorer: str,
    checkpoint: str | None,
    shards: Iterable[str],
    read_scores: Callable[[str], pa.Table],
) -> list[str]:
    """The warnings of a run, for its scorer (see the module docstring); [] for a sound one."""
    warnings = []
    if scorer != "random" and not checkpoint:
        warnings.append(
            "no --checkpoint: the proxy has its factory's weights (random, drawn from --seed, "
            "unless the factory loads trained ones itself), and an untrained proxy's scores say "
            "little about the samples"
        )
    if scorer in SKETCHED:  # both rank on (or filter by) the agreement
        spread = Spread()
        for name in shards:
            spread.add(read_scores(name)["score"])
        if spread.n > 1 and spread.std < FLAT_SPREAD:
            warnings.append(
                f"the scores have almost no spread (std {spread.std:.2g}, from "
                f"{spread.low:.4f} to {spread.high:.4f} over {spread.n} samples): the proxy "
                "barely tells the samples apart, so the kept set is close to arbitrary; train "
                "it on this data (or check --checkpoint)"
            )
    return warnings
