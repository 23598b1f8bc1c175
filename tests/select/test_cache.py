"""The parts cache (select/cache.py): one read per part while the parts fit, the same tables."""

from __future__ import annotations

import pyarrow as pa
import pytest
from test_bounded import by_shard, random_table

from sage_stream.select.bounded import select_parts
from sage_stream.select.cache import PartCache
from sage_stream.select.parts import local_map


class CountedReads:
    def __init__(self, parts: dict[str, pa.Table]) -> None:
        self.parts, self.reads = parts, {name: 0 for name in parts}

    def __call__(self, name: str) -> pa.Table:
        self.reads[name] += 1
        return self.parts[name]


def kept(read, names: list[str], scorer: str) -> pa.Table:
    got = select_parts(names, local_map(read), keep=0.3, balance="proportional",
                       min_score=None, scorer=scorer, seed=3)  # fmt: skip
    return pa.concat_tables(p.kept for p in got)


@pytest.mark.parametrize("scorer", ["sage-coverage", "random", "sage"])
def test_one_read_per_part_within_the_budget_and_the_same_selection(scorer):
    parts = by_shard(random_table(1, n=300))
    names = sorted(parts)
    plain = CountedReads(parts)
    expected = kept(plain, names, scorer)
    assert min(plain.reads.values()) >= 2  # the selection passes over every part more than once

    counted = CountedReads(parts)
    assert kept(PartCache(counted), names, scorer).equals(expected)
    assert set(counted.reads.values()) == {1}


def test_parts_past_the_budget_are_read_again():
    parts = by_shard(random_table(2, n=300))
    names = sorted(parts)
    first = parts[names[0]].nbytes
    counted = CountedReads(parts)
    cache = PartCache(counted, budget=first)  # room for the first part only
    expected = kept(CountedReads(parts), names, "sage-coverage")
    assert kept(cache, names, "sage-coverage").equals(expected)
    assert counted.reads[names[0]] == 1 and min(counted.reads[n] for n in names[1:]) >= 2
    assert cache.held_bytes == first
