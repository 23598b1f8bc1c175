"""Checks that stop or warn before a run wastes hours: where they sit in the flow.

- `FailFast` (the shard loop, both passes): once the first `FAIL_FAST_SAMPLES` samples are
  seen, if at least `FAIL_FAST_SHARE` of them failed, the run stops with the most common
  reason, in one line (a wrong --input-key would otherwise run both full passes and then say
  only "no sample could be scored").
- `run_warnings` (select): no --checkpoint, or scores with almost no spread (an untrained
  proxy gives every sample nearly the same agreement; the report's zoomed histograms would
  make it look like a real separation). The warnings go to the log, the selection's record,
  the manifest and the report.

Neither changes a result: a run that passes them writes exactly what it wrote before.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError
from .selection import SKETCHED

FAIL_FAST_SAMPLES = 256
FAIL_FAST_SHARE = 0.95
FLAT_SPREAD = 0.01  # scores whose standard deviation is below this tell samples apart poorly


class FailFast:
    """Counts successes and failure reasons; raises once, at the first check point, when
    nearly everything failed."""

    def __init__(self, samples: int = FAIL_FAST_SAMPLES, share: float = FAIL_FAST_SHARE):
        self.samples, self.share = samples, share
        self.seen = self.failed = 0
        self.reasons: Counter[str] = Counter()
        self.checked = False

    def record(self, ok: int, reasons: Iterable[str] = ()) -> None:
        failed = list(reasons)
        self.seen += ok + len(failed)
        self.failed += len(failed)
        if len(self.reasons) < 1000:  # bounded: a few distinct reasons is the normal case
            self.reasons.update(failed)
        if not self.checked and self.seen >= self.samples:
            self.checked = True
            if self.failed >= self.share * self.seen:
                raise InputError(
                    f"{self.failed} of the first {self.seen} samples failed, most often "
                    f"({most_common(self.reasons)}); stopped early: fix that, then run again"
                )


def most_common(reasons: Counter[str]) -> str:
    if not reasons:
        return "no reason recorded"
    reason, count = reasons.most_common(1)[0]
    return f"{count}×: {reason}"


def error_reasons(parts: Iterable[pa.Table]) -> Counter[str]:
    """Reasons of the error rows of scores parts (each read with its `reason` column)."""
    counts: Counter[str] = Counter()
    for part in parts:
        reasons = part["reason"].drop_null()
        for item in pc.value_counts(reasons).to_pylist():
            counts[item["values"]] += item["counts"]
    return counts


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
            "no --checkpoint: the proxy has its factory's weights (random, unless the factory "
            "loads trained ones itself), and an untrained proxy's scores say little about the "
            "samples"
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
