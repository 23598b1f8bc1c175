"""The score parts of one selection, read once and joined into batches of consecutive parts.

Where it sits: passes/select.py reads ``scores/part-<shard>.parquet`` through this before the
warnings, the near-copy search and the bounded selection (bounded.py), which together pass over
the parts five to eight times. A pass used to call a dozen pyarrow and numpy functions per
part, about 0.15 ms each: over 5,000 one-row shards that fixed cost was most of a select's
time (docs/benchmarks.md §8). Here consecutive parts (in shard-name order, with the same
schema) are concatenated into one table of at most `BATCH_BYTES`, with a column `PART` (each
row's part, by position in the batch), and every pass runs once per batch. Everything a pass
computes is a function of the row or an exact sum (counts, integer sums, histograms, minima),
so a batch gives what its parts give one by one; what is not (a part's class margins: a BLAS
product's last bits depend on how many rows it multiplies) is computed part by part, by
`PART`; an error is raised as the first part that has it would raise it alone.

Batches are kept, in shard order, while their Arrow bytes stay within `CACHE_BYTES`; a batch
past the budget is read again, part by part, by every pass. Memory stays bounded by the budget
plus one batch, whatever N is. `part` gives one part's table (a slice of its batch) for the
checks that go part by part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import InputError
from .parts import ReadPart
from .rules import PART

CACHE_BYTES = 256 * 2**20  # batches kept across passes (about 3·10^6 rows w/o signature)
BATCH_BYTES = 64 * 2**20  # a batch's Arrow bytes at most (one part larger than this: alone)
BATCH_ROWS = 1 << 13  # parts are joined only while the batch has fewer rows: a larger part
# costs little per pass for its rows, and joining would copy it


@dataclass(frozen=True)
class Batch:
    """Consecutive parts: their shard names and rows, in order."""

    index: int
    names: tuple[str, ...]
    rows: tuple[int, ...]

    def bounds(self) -> list[int]:
        """Row offsets of the parts in the batch table (len(names) + 1)."""
        return [0, *np.cumsum(self.rows, dtype=np.int64).tolist()]


class Batches:
    """The parts of `names`, read once (see the module). `batches` in shard-name order."""

    def __init__(self, read: ReadPart, names: list[str], budget: int | None = None,
                 batch_bytes: int | None = None) -> None:  # fmt: skip
        self._read = read
        self._budget = CACHE_BYTES if budget is None else budget
        self._held: dict[int, pa.Table] = {}
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> batch, first row, rows
        self.held_bytes = 0
        self.batches: list[Batch] = []
        limit = BATCH_BYTES if batch_bytes is None else batch_bytes
        pending: list[tuple[str, pa.Table]] = []
        size = rows = 0
        for name in sorted(names):
            table = read(name)
            full = size + table.nbytes > limit or rows + table.num_rows > BATCH_ROWS
            if pending and (full or table.schema != pending[0][1].schema):
                self._seal(pending)
                pending, size, rows = [], 0, 0
            pending.append((name, table))
            size, rows = size + table.nbytes, rows + table.num_rows
        if pending:
            self._seal(pending)

    def _seal(self, pending: list[tuple[str, pa.Table]]) -> None:
        batch = Batch(len(self.batches), tuple(n for n, _ in pending),
                      tuple(t.num_rows for _, t in pending))  # fmt: skip
        self.batches.append(batch)
        for name, start, rows in zip(batch.names, batch.bounds(), batch.rows, strict=False):
            self._where[name] = (batch.index, start, rows)
        table = _join([t for _, t in pending], batch.rows)
        if self.held_bytes + table.nbytes <= self._budget:
            self._held[batch.index] = table
            self.held_bytes += table.nbytes

    def table(self, batch: Batch) -> pa.Table:
        """The batch's parts as one table with the column PART (the same object while held)."""
        held = self._held.get(batch.index)
        if held is not None:
            return held
        return _join([self._read(name) for name in batch.names], batch.rows)

    def part(self, name: str) -> pa.Table:
        """One part, as `read` gives it (a slice of its batch while the batch is held)."""
        index, start, rows = self._where.get(name, (-1, 0, 0))
        held = self._held.get(index)
        if held is None:
            return self._read(name)
        return held.slice(start, rows).drop_columns([PART])

    def map(self, fn: Callable[[pa.Table], object], batches: list[Batch]) -> Iterator[object]:
        """fn of each batch's table, in order (a MapParts over batches: parts.py)."""
        for batch in batches:
            yield _run(fn, self.table(batch), batch)


def _join(tables: list[pa.Table], rows: tuple[int, ...]) -> pa.Table:
    """The parts as one table of one chunk per column, with PART."""
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables).combine_chunks()
    part = np.repeat(np.arange(len(rows), dtype=np.int32), rows)
    return table.append_column(PART, pa.array(part))


def _run(fn: Callable[[pa.Table], object], table: pa.Table, batch: Batch) -> object:
    """fn(table); on bad input, the error of the first part that has it alone (the error a
    pass over the parts one by one raises)."""
    try:
        return fn(table)
    except InputError:
        if len(batch.names) == 1:
            raise
        bounds = batch.bounds()
        for i in range(len(batch.names)):
            fn(table.slice(bounds[i], batch.rows[i]))
        raise
