"""Checks that stop a run before it wastes hours (the shard loop, both passes).

`FailFast`: once the first `FAIL_FAST_SAMPLES` samples are seen, if at least `FAIL_FAST_SHARE`
of them failed, the run stops with the most common reason, in one line (a wrong --input-key
would otherwise run both full passes and then say only "no sample could be scored").
`error_reasons` gives the same summary after a pass that scored nothing. The selection's own
warnings (no checkpoint, flat scores) are select/warn.py's. Neither changes a result: a run
that passes them writes exactly what it wrote before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError

FAIL_FAST_SAMPLES = 256
FAIL_FAST_SHARE = 0.95


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


def nothing_scored(
    errored: int, shard_errors: list[dict[str, str]], parts: Iterable[pa.Table], where: str
) -> InputError:
    """The error of a pass that scored no sample, naming what went wrong: the broken shards
    first (a shard whose stream broke leaves few or no error rows, so the row reasons alone
    said "no reason recorded"), then the most common reason of the error rows."""
    causes = []
    if shard_errors:
        first = shard_errors[0]
        more = f" and {len(shard_errors) - 1} more" if len(shard_errors) > 1 else ""
        causes.append(f"{len(shard_errors)} shard(s) broken: {first['shard']}: "
                      f"{first['reason']}{more}")  # fmt: skip
    if errored or not shard_errors:
        causes.append(f"{errored} error rows, most often {most_common(error_reasons(parts))}")
    return InputError(
        f"no sample could be scored ({'; '.join(causes)}): the reasons of all are in {where}"
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
