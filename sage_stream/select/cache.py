"""The score parts a selection reads, kept in memory across its passes while they fit a budget.

Where it sits: passes/select.py reads ``scores/part-<shard>.parquet`` through this before the
warnings, the near-copy search and the bounded selection (bounded.py), which together pass over
the parts five to eight times. Each pass used to read every part again: at 5,000 one-row shards
that was most of a select's time. Parts are kept, in the order first read, while the Arrow
bytes kept stay within `CACHE_BYTES`; a part past the budget is read again by every pass, as
before. Memory stays bounded by the budget plus one part, whatever N is; the results are the
same, because a part read twice is the same table.
"""

from __future__ import annotations

import pyarrow as pa

from .parts import ReadPart

CACHE_BYTES = 256 * 2**20  # Arrow buffers kept across passes (about 3·10^6 rows w/o signature)


class PartCache:
    """A ReadPart that remembers the parts it read while they fit `budget` bytes."""

    def __init__(self, read: ReadPart, budget: int = CACHE_BYTES) -> None:
        self._read, self._budget = read, budget
        self._kept: dict[str, pa.Table] = {}
        self._bytes = 0

    def __call__(self, name: str) -> pa.Table:
        table = self._kept.get(name)
        if table is None:
            table = self._read(name)
            if self._bytes + table.nbytes <= self._budget:
                self._kept[name] = table
                self._bytes += table.nbytes
        return table

    @property
    def held_bytes(self) -> int:
        return self._bytes
