"""A part's (or batch's) derived table, computed once per table object within a byte budget.

Where it sits: select's passes (bounded.py, coverage.py) turn each part or batch into what they
rank by, pass after pass. select/batches.py hands every pass the same table object while it
holds the batch, so a result keyed by the table's identity is reused; past its budget a batch is
read again as a new object and the result is computed again. An entry pins its table, so what
an entry costs (`size`) must count the table too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import pyarrow as pa

T = TypeVar("T")


class TableMemo(Generic[T]):
    """`fn(table)` once per table object while the kept entries' `size`s stay within `budget`."""

    def __init__(
        self, fn: Callable[[pa.Table], T], size: Callable[[pa.Table, T], int], budget: int
    ) -> None:
        self.fn, self.size, self.budget = fn, size, budget
        self.memo: dict[int, tuple[pa.Table, T]] = {}
        self.held = 0

    def __call__(self, table: pa.Table) -> T:
        hit = self.memo.get(id(table))
        if hit is not None and hit[0] is table:
            return hit[1]
        out = self.fn(table)
        size = self.size(table, out)
        if self.held + size <= self.budget:
            self.memo[id(table)] = (table, out)
            self.held += size
        return out
