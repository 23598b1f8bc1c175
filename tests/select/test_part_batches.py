"""Parts read once and joined into batches (select/batches.py): the same selection, decisions and
errors as part by part, one read per part within the budget, a re-read past it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from test_bounded import by_shard, random_table
from test_decisions import clean, fine, signed

from sage_stream.errors import InputError
from sage_stream.select.batches import Batches
from sage_stream.select.bounded import select_parts, select_units
from sage_stream.select.decisions import Tally
from sage_stream.select.parts import local_map


class CountedReads:
    def __init__(self, parts: dict[str, pa.Table]) -> None:
        self.parts, self.reads = parts, {name: 0 for name in parts}

    def __call__(self, name: str) -> pa.Table:
        self.reads[name] += 1
        return self.parts[name]


def _parts(seed: int, scorer: str, sign: bool, shards: int = 9) -> dict[str, pa.Table]:
    table = fine(random_table(seed, n=500, shards=shards))
    table = clean(table) if scorer == "sage-coverage" else table
    parts = by_shard(signed(table) if sign else table)
    parts["s-empty"] = parts[sorted(parts)[0]].slice(0, 0)  # a shard without rows
    return parts


def _per_part(parts: dict[str, pa.Table], **kwargs) -> list:
    return list(select_parts(list(parts), local_map(parts.__getitem__), **kwargs))


def _batched(batches: Batches, **kwargs) -> tuple[list, Tally]:
    tally, got = Tally(), []
    for unit in select_units(batches.batches, batches.map, lambda b: b.names, **kwargs):
        tally.add(unit.decisions)
        got.extend(unit.parts)
    return got, tally


def _same(a: list, b: list) -> None:
    assert [p.shard for p in a] == [p.shard for p in b]
    for x, y in zip(a, b, strict=True):
        assert x.candidates == y.candidates
        assert x.kept.equals(y.kept), x.shard
        assert x.decisions.equals(y.decisions), x.shard


@pytest.mark.parametrize("scorer", ["sage-coverage", "sage", "random", "loss-easy"])
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("amount", [{"keep": 0.3}, {"min_score": 0.1}])
def test_batches_select_and_decide_as_the_parts_one_by_one(scorer, sign, amount):
    parts = _parts(2, scorer, sign)
    kwargs = {"scorer": scorer, "seed": 1, "memory_rows": 16, **amount}
    expected = _per_part(parts, **kwargs)
    one_tally = Tally()
    for p in expected:
        one_tally.add(p.decisions)
    total = sum(t.nbytes for t in parts.values())
    for batch_bytes, budget in ((total, None), (total // 3, None), (total // 3, total // 2)):
        batches = Batches(parts.__getitem__, list(parts), budget=budget, batch_bytes=batch_bytes)
        assert len(batches.batches) < len(parts)  # some parts share a batch
        got, tally = _batched(batches, **kwargs)
        _same(got, expected)
        assert tally.summary({}, scorer) == one_tally.summary({}, scorer)


def test_one_read_per_part_within_the_budget_and_parts_past_it_read_again():
    parts = _parts(3, "sage-coverage", True)
    names = sorted(parts)
    counted = CountedReads(parts)
    batches = Batches(counted, names)
    assert len(batches.batches) == 1
    for name in names:  # a part is its batch's slice, as read
        assert batches.part(name).equals(parts[name])
    _same(_batched(batches, keep=0.3, scorer="sage-coverage")[0],
          _per_part(parts, keep=0.3, scorer="sage-coverage"))  # fmt: skip
    assert set(counted.reads.values()) == {1}

    first = parts[names[0]].nbytes
    counted = CountedReads(parts)
    batches = Batches(counted, names, budget=first * 2, batch_bytes=first)
    _batched(batches, keep=0.3, scorer="sage-coverage")
    assert counted.reads[names[0]] == 1 and min(counted.reads[n] for n in names[1:]) >= 2


def test_parts_of_another_schema_start_a_new_batch():
    parts = _parts(4, "sage", False)
    names = sorted(parts)
    parts[names[3]] = parts[names[3]].append_column(
        "extra", pa.array([1] * parts[names[3]].num_rows)
    )
    batches = Batches(parts.__getitem__, names)
    assert [len(b.names) for b in batches.batches] == [3, 1, len(names) - 4]
    _same(_batched(batches, keep=0.3, scorer="sage")[0], _per_part(parts, keep=0.3, scorer="sage"))


def test_errors_are_those_of_the_first_part_that_has_one():
    parts = _parts(5, "sage", False)
    names = sorted(parts)
    # the same (shard, key) in two parts: each part alone is sound, so the batch is too
    a, b = parts[names[1]], parts[names[2]]
    twin = b.set_column(b.schema.get_field_index("__shard__"), "__shard__",
                        pa.array([a["__shard__"][0].as_py()] * b.num_rows))  # fmt: skip
    twin = twin.set_column(twin.schema.get_field_index("__key__"), "__key__",
                           pc.if_else(pa.array([True] + [False] * (b.num_rows - 1)),
                                      a["__key__"][0].as_py(), b["__key__"]))  # fmt: skip
    parts[names[2]] = twin
    _same(_batched(Batches(parts.__getitem__, names), keep=0.3, scorer="sage")[0],
          _per_part(parts, keep=0.3, scorer="sage"))  # fmt: skip
    # a key scored twice within a part (the fourth) and a null key in a later one (the sixth)
    bad = parts[names[4]]
    parts[names[4]] = pa.concat_tables([bad, bad.slice(0, 1)])
    late = parts[names[6]]
    keys = pa.array([None] * late.num_rows, pa.string())
    parts[names[6]] = late.set_column(late.schema.get_field_index("__key__"), "__key__", keys)
    with pytest.raises(InputError) as one:
        _per_part(parts, keep=0.3, scorer="sage")
    with pytest.raises(InputError) as batch:
        _batched(Batches(parts.__getitem__, names), keep=0.3, scorer="sage")
    assert str(batch.value) == str(one.value) and "scored more than once" in str(one.value)


def test_select_reads_no_more_signatures_once_a_candidate_lacks_one(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import sage_stream
    from sage_stream.passes import select as step

    parts = _parts(6, "sage-coverage", True)
    names = sorted(parts)[1:]  # the shards with rows
    unsigned = parts[names[2]]
    nulls = pa.nulls(unsigned.num_rows, unsigned.schema.field("signature").type)
    parts[names[2]] = unsigned.set_column(unsigned.schema.get_field_index("signature"),
                                          "signature", nulls)  # fmt: skip
    (tmp_path / "scores").mkdir()
    for name in names:
        pq.write_table(parts[name], tmp_path / "scores" / f"part-{name}.parquet")
    asked = []
    read_part = step.read_part
    monkeypatch.setattr(
        step, "read_part", lambda *a: asked.append("signature" in a[3]) or read_part(*a)
    )
    sage_stream.select(out=str(tmp_path), keep=0.3, scorer="sage-coverage")
    assert asked[:4] == [True, True, True, False] and not any(asked[3:])

    expected = _per_part({n: parts[n] for n in names}, keep=0.3, scorer="sage-coverage")
    got = pq.read_table(tmp_path / "selection.parquet").replace_schema_metadata(None)
    assert got.equals(pa.concat_tables(p.kept for p in expected))
    decisions = pq.read_table(tmp_path / "decisions.parquet").replace_schema_metadata(None)
    assert decisions.equals(pa.concat_tables(p.decisions for p in expected))


def test_scores_without_a_sage_score_are_refused_by_the_first_part_with_a_candidate(tmp_path):
    import pyarrow.parquet as pq

    import sage_stream

    parts = _parts(7, "sage", False)
    names = sorted(parts)[1:4]
    first = parts[names[0]]  # error rows only: says nothing, even without scores
    first = first.set_column(first.schema.get_field_index("status"), "status",
                             pa.array(["error"] * first.num_rows))  # fmt: skip
    (tmp_path / "scores").mkdir()
    for name in names[1:]:
        table = parts[name]
        nulls = pa.nulls(table.num_rows, pa.float64())
        parts[name] = table.set_column(table.schema.get_field_index("score"), "score", nulls)
    for name, table in ((names[0], first), *((n, parts[n]) for n in names[1:])):
        pq.write_table(table, tmp_path / "scores" / f"part-{name}.parquet")
    with pytest.raises(InputError, match="have no SAGE score"):
        sage_stream.select(out=str(tmp_path), keep=0.3, scorer="sage")
    assert sage_stream.select(out=str(tmp_path), keep=0.3, scorer="loss").kept > 0


def test_margins_kept_across_passes_count_every_table_they_pin(monkeypatch):
    # past the cache budget every pass reads a batch again: a memo entry then pins a table
    # nobody else holds, so what the memo holds must count it whole (it once counted only the
    # added columns, and held several times its budget)
    from sage_stream.select import coverage
    from sage_stream.select.memo import TableMemo

    memos = []
    made = TableMemo.__call__

    def spy(self, table):
        if self.budget == coverage.MEMO_BYTES:  # the class-margin memo, not the prepared rows
            memos.append(self)
        return made(self, table)

    monkeypatch.setattr(TableMemo, "__call__", spy)
    parts = by_shard(signed(clean(fine(random_table(2, n=2000, shards=20)))))
    batches = Batches(parts.__getitem__, sorted(parts), budget=0,
                      batch_bytes=sum(t.nbytes for t in parts.values()) // 6)  # fmt: skip
    list(select_units(batches.batches, batches.map, lambda b: b.names, keep=0.3,
                      scorer="sage-coverage"))  # fmt: skip
    assert memos
    for memo in {id(m): m for m in memos}.values():
        pinned = sum(t.nbytes + out.nbytes for t, out in memo.memo.values())
        shared = sum(t.nbytes for t, _ in memo.memo.values())  # out reuses the table's columns
        assert memo.held >= pinned - shared
        assert memo.held <= coverage.MEMO_BYTES


def test_a_signature_with_nan_is_an_error_naming_its_shard_and_key():
    # pass 2 never writes one; a NaN made the fixed-point scale depend on how parts were batched
    import numpy as np

    parts = by_shard(signed(clean(fine(random_table(3, n=400, shards=4)))))
    name = sorted(parts)[1]
    part = parts[name]
    sig = np.array(part["signature"].to_pylist(), dtype=np.float32)
    sig[2, 5] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), sig.shape[1])
    parts[name] = part.set_column(part.schema.get_field_index("signature"), "signature", column)
    key = part["__key__"][2].as_py()
    with pytest.raises(InputError, match=rf"{name}.*{key}.*NaN or inf"):
        list(select_parts(list(parts), local_map(parts.__getitem__), keep=0.3,
                          scorer="sage-coverage"))  # fmt: skip
