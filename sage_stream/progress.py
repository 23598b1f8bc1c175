"""Progress of a pass: a bar on a terminal (samples/s, shards done), plain log lines otherwise.

Batch jobs write to log files, where a redrawn bar is noise; there we log one line per shard
and at most one line every `LOG_EVERY_S` seconds in between.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("sage_stream")
LOG_EVERY_S = 30.0


class Progress:
    def __init__(self, name: str, total_shards: int, enabled: bool | None = None):
        self.name, self.total_shards = name, total_shards
        self.samples = self.shards = 0
        self.start = self._last_log = time.monotonic()
        interactive = sys.stderr.isatty() if enabled is None else enabled
        self._bar = (
            tqdm(desc=name, unit=" samples", file=sys.stderr, dynamic_ncols=True, leave=True)
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

    def shard_done(self, name: str) -> None:
        self.shards += 1
        self._update_postfix()
        if self._bar is None:
            self._log(f" ({name})")

    def _log(self, suffix: str) -> None:
        self._last_log = time.monotonic()
        log.info(
            "%s: %d/%d shards, %d samples, %.1f samples/s%s",
            self.name,
            self.shards,
            self.total_shards,
            self.samples,
            self.rate,
            suffix,
        )

    def close(self) -> float:
        """Finish the bar; returns the pass's wall time in seconds."""
        if self._bar is not None:
            self._bar.refresh()
            self._bar.close()
        return time.monotonic() - self.start
