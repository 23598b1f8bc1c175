"""Progress of a pass: a bar on a terminal (samples/s, shards done), plain log lines otherwise.

Batch jobs write to log files, where a redrawn bar is noise; there we log one line per shard
and at most one line every `LOG_EVERY_S` seconds in between.

The bar has a total, a percentage and an ETA: exact when the pass knows its sample count
(`total_samples`), else estimated from the shards done so far (samples per shard so far ×
shards), refined after every shard. Log lines say the same.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("sage_stream")
LOG_EVERY_S = 30.0


class Progress:
    def __init__(
        self,
        name: str,
        total_shards: int,
        enabled: bool | None = None,
        total_samples: int | None = None,
    ):
        self.name, self.total_shards = name, total_shards
        self.total_samples = total_samples
        self.samples = self.shards = 0
        self.start = self._last_log = time.monotonic()
        interactive = sys.stderr.isatty() if enabled is None else enabled
        self._bar = (
            tqdm(
                desc=name,
                unit=" samples",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
                total=total_samples,
            )  # fmt: skip
            if interactive
            else None
        )
        self._update_postfix()

    def _update_postfix(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"shards {self.shards}/{self.total_shards}", refresh=False)

    @property
    def rate(self) -> float:
        return self.samples / max(time.monotonic() - self.start, 1e-9)

    def advance(self, samples: int) -> None:
        self.samples += samples
        if self._bar is not None:
            self._bar.update(samples)
        elif time.monotonic() - self._last_log > LOG_EVERY_S:
            self._log("")

    @property
    def expected(self) -> int | None:
        """The pass's sample count: exact if given, else estimated from the shards done."""
        if self.total_samples is not None:
            return self.total_samples
        if not self.shards:
            return None
        return max(self.samples, round(self.samples / self.shards * self.total_shards))

    def eta(self) -> float | None:
        expected = self.expected
        if expected is None or self.rate <= 0:
            return None
        return max(expected - self.samples, 0) / self.rate

    def shard_done(self, name: str) -> None:
        self.shards += 1
        if self._bar is not None and self.total_samples is None:
            self._bar.total = self.expected  # the bar's ETA follows the estimate
        self._update_postfix()
        if self._bar is None:
            self._log(f" ({name})")

    def _log(self, suffix: str) -> None:
        self._last_log = time.monotonic()
        expected, eta = self.expected, self.eta()
        of = ""
        if expected:
            approx = "" if self.total_samples is not None else "~"
            of = f" of {approx}{expected} ({100 * self.samples / expected:.0f}%)"
        left = (
            f", ETA {_duration(eta)}" if eta is not None and self.shards < self.total_shards else ""
        )
        log.info(
            "%s: %d/%d shards, %d samples%s, %.1f samples/s%s%s",
            self.name,
            self.shards,
            self.total_shards,
            self.samples,
            of,
            self.rate,
            left,
            suffix,
        )

    def close(self) -> float:
        """Finish the bar; returns the pass's wall time in seconds."""
        if self._bar is not None:
            self._bar.refresh()
            self._bar.close()
        return time.monotonic() - self.start


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
