"""Every scores row's decision (select/decisions.py), made in bounded.py's write pass, against a
direct computation on the whole table: the kept set of the in-memory reference, the class cut
from its kept values, and sage-coverage's filter from its data-wide parameters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from decided import class_margin, expected
from test_bounded import by_shard, random_table
from test_dedup import parts_of, planted

from sage_stream.select import dedup
from sage_stream.select.bounded import select_parts
from sage_stream.select.decisions import DECISION_SCHEMA, DECISIONS, Tally
from sage_stream.select.parts import local_map
from sage_stream.select.reference import select
from sage_stream.select.rules import ok_mask


def decided(table: pa.Table, **kwargs) -> tuple[pa.Table, pa.Table]:
    """(kept rows, decisions) of the bounded path, every part's concatenated."""
    parts = by_shard(table)
    got = list(select_parts(list(parts), local_map(parts.__getitem__), memory_rows=16, **kwargs))
    for p in got:  # one decision per row of its part, in the part's order
        assert p.decisions.schema == DECISION_SCHEMA
        assert p.decisions["__key__"].to_pylist() == parts[p.shard]["__key__"].to_pylist()
    return (pa.concat_tables(p.kept for p in got), pa.concat_tables(p.decisions for p in got))


def clean(table: pa.Table) -> pa.Table:
    """The table with its losses scaled down (ties kept): the pool of the second round's
    noisy-pool switch, kept so that the recorded cases stay the same."""
    loss = np.asarray(table["loss"].to_pylist(), dtype=np.float64) * 0.001
    return table.set_column(table.schema.get_field_index("loss"), "loss", pa.array(loss))


def fine(table: pa.Table) -> pa.Table:
    """The table with agreements off the grid: a class's lowest few are then below its cut."""
    score = np.random.default_rng(5).uniform(-1, 1, table.num_rows)
    return table.set_column(table.schema.get_field_index("score"), "score", pa.array(score))


@pytest.mark.parametrize("scorer", ["sage-coverage", "sage", "loss-easy", "random"])
@pytest.mark.parametrize("amount", [{"keep": 0.3}, {"keep": 1.0}, {"min_score": 0.1}])
@pytest.mark.parametrize("ties", [True, False])
def test_each_row_decided_as_computed_on_the_whole_table(scorer, amount, ties):
    table = random_table(seed=1) if ties else fine(random_table(seed=1))
    table = clean(table) if scorer == "sage-coverage" else table
    kept, decisions = decided(table, scorer=scorer, **amount)
    ranked_by = "sage" if scorer == "sage-coverage" and "min_score" in amount else scorer
    reference = select(table, scorer=scorer, **amount)
    assert sorted(kept["__key__"].to_pylist()) == sorted(reference["__key__"].to_pylist())
    want = expected(table, reference, ranked_by, amount.get("keep"), amount.get("min_score"))
    by_name = {(r["__shard__"], r["__key__"]): r for r in decisions.to_pylist()}
    assert len(by_name) == decisions.num_rows == table.num_rows  # exactly one per row
    for i, (shard, key) in enumerate(zip(table["__shard__"].to_pylist(),
                                         table["__key__"].to_pylist(), strict=True)):  # fmt: skip
        got = by_name[(shard, key)]
        why, value, cut = want[i]
        assert (got["decision"], got["kept"]) == (why, why == "kept"), (shard, key)
        assert got["value"] == value and got["cut"] == cut, (shard, key)
    reasons = set(decisions["decision"].to_pylist())
    assert reasons <= set(DECISIONS) and "error" in reasons
    if scorer == "sage-coverage" and amount.get("keep") == 0.3 and not ties:
        assert {"agreement", "coverage", "below_cut"} <= reasons  # the data exercise each


def test_the_tally_adds_up_to_the_decisions():
    table = clean(random_table(seed=2))  # a clean pool: the filter's numbers are recorded
    _, decisions = decided(table, scorer="sage-coverage", keep=0.4)
    tally = Tally()
    for part in by_shard(decisions).values():
        tally.add(part)
    tally.add(decisions.slice(0, 0))  # an empty shard adds nothing
    summary = tally.summary({"keep": 0.4}, "sage-coverage")
    rows = decisions.to_pylist()
    assert sum(summary["totals"].values()) == len(rows)
    for c in summary["classes"]:
        mine = [r for r in rows if r["label"] == c["label"]]
        assert c["rows"] == len(mine) and c["kept"] == sum(r["kept"] for r in mine)
        scored = [r for r in mine if r["decision"] != "error"]
        assert c["cut"] == scored[0]["cut"] and c["agreement_cut"] == scored[0]["agreement_cut"]
        assert c["coverage_cap"] == scored[0]["coverage_cap"]


def test_near_copies_name_the_sample_they_copy():
    table, _ = planted(seed=2)
    parts = parts_of(table)
    with dedup.Duplicates(dedup.find_duplicates(list(parts), local_map(parts.__getitem__))) as d:
        found = pa.concat_tables(d.tables()).to_pylist()
        got = [p.decisions for p in select_parts(list(parts), local_map(parts.__getitem__),
                                                   keep=0.25, scorer="random", duplicates=d)]  # fmt: skip
    rows = {(r["__shard__"], r["__key__"]): r for r in pa.concat_tables(got).to_pylist()}
    assert found
    for dup in found:
        row = rows[(dup["__shard__"], dup["__key__"])]
        assert row["decision"] == "duplicate" and not row["kept"]
        assert (row["duplicate_of_shard"], row["duplicate_of_key"]) == (
            dup["duplicate_of_shard"], dup["duplicate_of_key"])  # fmt: skip
    copies = {(d["__shard__"], d["__key__"]) for d in found}
    assert all(r["duplicate_of_key"] is None for n, r in rows.items() if n not in copies)


def signed(table: pa.Table, flipped: int = 12, seed: int = 4) -> pa.Table:
    """The table with signatures around its classes' centres; `flipped` candidates' labels
    moved to the next class (their signatures stay): the class-mean rule decides."""
    rng = np.random.default_rng(seed)
    labels = np.array(table["label"].to_pylist())
    centres = rng.normal(0, 3, (labels.max() + 1, 32))
    sig = centres[labels] + rng.normal(0, 1, (len(labels), 32))
    moved = rng.choice(np.flatnonzero(ok_mask(table)), flipped, replace=False)
    labels[moved] = (labels[moved] + 1) % (labels.max() + 1)
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    column = pa.array(list(sig.astype(np.float32)), pa.list_(pa.float32(), 32))
    if "signature" in table.column_names:
        return table.set_column(table.schema.get_field_index("signature"), "signature", column)
    return table.append_column("signature", column)


@pytest.mark.parametrize("keep", [0.3, 1.0])
def test_the_class_mean_rule_records_each_rows_margin_and_nearer_class(keep):
    table = signed(fine(random_table(seed=1)))
    kept, decisions = decided(table, scorer="sage-coverage", keep=keep)
    reference = select(table, scorer="sage-coverage", keep=keep)
    assert sorted(kept["__key__"].to_pylist()) == sorted(reference["__key__"].to_pylist())
    want = expected(table, reference, "sage-coverage", keep, None)
    by_name = {(r["__shard__"], r["__key__"]): r for r in decisions.to_pylist()}
    margin = class_margin(table, ok_mask(table))
    for i, name in enumerate(zip(table["__shard__"].to_pylist(), table["__key__"].to_pylist(),
                                 strict=True)):  # fmt: skip
        got = by_name[name]
        assert got["decision"] == want[i][0]
        if want[i][0] != "error":
            assert got["class_margin"] == pytest.approx(margin[i], abs=1e-5)
            assert got["agreement_cut"] is None and got["coverage_cap"] is None
    aside = [r for r in decisions.to_pylist() if r["decision"] == "other_class"]
    assert (len(aside) >= 10) == (keep < 1.0)  # at keep 1.0 everything is kept
    assert all(r["class_margin"] < 0 and r["nearer_class"] != r["label"] for r in aside)
    tally = Tally()
    tally.add(decisions)
    classes = tally.summary({"keep": keep}, "sage-coverage")["classes"]
    assert classes and not any("agreement_cut" in c or "coverage_cap" in c for c in classes)
