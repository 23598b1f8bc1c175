"""The sage-coverage ranking: the class-mean filter and its uniform seeded draw; without
signatures the agreement and τ filter and its weighted draw; its errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from decided import class_margin

from sage_stream.errors import InputError
from sage_stream.select import coverage
from sage_stream.select.bounded import select_parts
from sage_stream.select.parts import local_map
from sage_stream.select.reference import select


def _table(n: int = 40) -> pa.Table:
    rng = np.random.default_rng(3)
    return pa.table(
        {
            "__key__": [f"k{i:03d}" for i in range(n)],
            "__shard__": ["a.tar"] * (n // 2) + ["b.tar"] * (n - n // 2),
            "label": [i % 2 for i in range(n)],
            "score": rng.uniform(-1, 1, n),
            "coverage": rng.uniform(0.09, 0.11, n),
            "loss": rng.uniform(0, 0.04, n),  # every loss under UNFIT_LOSS: a clean pool
            "grad_norm": rng.uniform(0, 2, n),
            "status": ["ok"] * n,
        }
    )


def test_the_draw_is_deterministic_order_free_and_seeded():
    table = _table()
    first = select(table, keep=0.3, scorer="sage-coverage", seed=0)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    assert select(shuffled, keep=0.3, scorer="sage-coverage", seed=0).equals(first)
    other = select(table, keep=0.3, scorer="sage-coverage", seed=1)
    assert other["__key__"].to_pylist() != first["__key__"].to_pylist()


def test_low_agreement_goes_last_and_min_score_is_on_agreement():
    table = _table()
    score = table["score"].to_numpy()
    labels = np.array(table["label"].to_pylist())
    ok = np.ones(table.num_rows, dtype=bool)
    values = coverage.coverage_ranking(table, ok, 0, quantile=0.25, support=np.inf)
    for c in (0, 1):
        members = np.flatnonzero(labels == c)
        worst = members[np.argsort(score[members])[:5]]  # 25% of 20
        rest = np.setdiff1d(members, worst)
        assert values[worst].max() < values[rest].min()  # the filtered share goes last
        assert np.array_equal(np.argsort(values[worst]), np.argsort(score[worst]))
    everything = select(table, keep=1.0, scorer="sage-coverage")
    assert everything.num_rows == table.num_rows
    by_threshold = select(table, min_score=0.3, scorer="sage-coverage")
    assert by_threshold.equals(select(table, min_score=0.3, scorer="sage"))


def _one_class(n: int, tau: np.ndarray, grad_norm: np.ndarray) -> pa.Table:
    table = _table(n).set_column(2, "label", pa.array([0] * n))
    for name, values in (("coverage", tau), ("grad_norm", grad_norm)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    return table


def _heavy_share(table: pa.Table, heavy: np.ndarray, draws: int = 20) -> float:
    """Share of the top 10% over `draws` seeds (no filters, T = 1) that are `heavy` rows."""
    ok = np.ones(table.num_rows, dtype=bool)
    top = table.num_rows // 10
    hits = 0
    for seed in range(draws):
        values = coverage.coverage_ranking(
            table, ok, seed, quantile=0.0, support=np.inf, temperature=1.0
        )
        hits += int(heavy[np.argsort(-values)[:top]].sum())
    return hits / (draws * top)


def test_weighted_draw_follows_the_leverage_of_the_direction():
    # Weight τ/‖g‖²: with equal norms, rows with 9x the leverage are kept far more often ...
    n = 200
    heavy = np.arange(n) < n // 2
    by_tau = _one_class(n, np.where(heavy, 0.9, 0.1), np.ones(n))
    assert _heavy_share(by_tau, heavy) > 0.8
    # ... and with equal τ, rows whose gradient is 3x smaller (so whose direction has 9x the
    # leverage) are too; a larger τ that only comes from a larger gradient weighs nothing more.
    by_direction = _one_class(n, np.full(n, 0.1), np.where(heavy, 1.0 / 3.0, 1.0))
    assert _heavy_share(by_direction, heavy) > 0.8
    by_size = _one_class(n, np.where(heavy, 0.9, 0.1), np.where(heavy, 3.0, 1.0))
    assert 0.3 < _heavy_share(by_size, heavy, draws=40) < 0.7


def test_unsupported_samples_go_last_and_infinite_temperature_is_uniform():
    n = 100
    table = _table(n).set_column(2, "label", pa.array([0] * n))
    tau = np.full(n, 0.01)
    tau[:5] = 1.0  # mean 0.0595: these five are above 0.5 x mean
    table = table.set_column(table.schema.get_field_index("coverage"), "coverage", pa.array(tau))
    ok = np.ones(n, dtype=bool)
    values = coverage.coverage_ranking(table, ok, 0, quantile=0.0, support=0.5)
    assert set(np.argsort(values)[:5]) == set(range(5))
    flat = coverage.coverage_ranking(table, ok, 0, quantile=0.0, support=0.5,
                                     temperature=np.inf)  # fmt: skip
    noise = coverage.gumbel_noise(table, 0)
    np.testing.assert_array_equal(np.argsort(flat[5:]), np.argsort(noise[5:]))  # only the noise


def test_missing_coverage_is_a_clear_error():
    table = _table().drop_columns(["coverage"])
    with pytest.raises(InputError, match="coverage"):
        select(table, keep=0.5, scorer="sage-coverage")


def _rare_class(over: int) -> pa.Table:
    """40 samples of class 0 with small τ, 4 of class 1 of which `over` have a large τ."""
    tau = [0.01] * 40 + [1.0] * over + [0.01] * (4 - over)
    n = len(tau)
    return pa.table({
        "__key__": [f"k{i:03d}" for i in range(n)], "__shard__": ["a.tar"] * n,
        "label": [0] * 40 + [1] * 4, "score": np.linspace(0.5, 0.9, n), "coverage": tau,
        "loss": np.full(n, 0.01), "grad_norm": np.ones(n), "status": ["ok"] * n,
    })  # fmt: skip


def test_a_class_mostly_over_the_cap_is_exempt_with_a_capped_share():
    ok = np.ones(44, dtype=bool)
    cap = coverage.params(coverage.part_sums(_rare_class(4), ok), 0.0, 1.0).cap
    assert 0.01 < cap < 1.0  # every sample of class 1 is over the global cap ...
    values = coverage.coverage_ranking(_rare_class(4), ok, 0, quantile=0.0, support=1.0,
                                       capped_share=0.5)  # fmt: skip
    assert (values[40:] > 2).all()  # ... but the class is exempt: all of it passes
    few = coverage.coverage_ranking(_rare_class(1), ok, 0, quantile=0.0, support=1.0,
                                    capped_share=0.5)  # fmt: skip
    assert few[40] <= 1 and (few[41:] > 2).all()  # one of four over the cap: that one goes last
    default = coverage.coverage_ranking(_rare_class(4), ok, 0, quantile=0.0, support=1.0)
    assert (default[40:] <= 1).all()  # the default share (1.0) exempts no class


def _signed(n: int = 300, flipped: tuple[int, ...] = (3, 125, 247), seed: int = 5) -> pa.Table:
    """Three classes of signatures around three means (class = i % 3), `flipped` rows given
    the next class's label: their signatures stay with their true class."""
    rng = np.random.default_rng(seed)
    true = np.arange(n) % 3
    centres = rng.normal(0, 3, (3, 32))
    sig = (centres[true] + rng.normal(0, 1, (n, 32))).astype(np.float32)
    labels = true.copy()
    labels[list(flipped)] = (true[list(flipped)] + 1) % 3
    base = _table(n)
    base = base.set_column(base.schema.get_field_index("label"), "label", pa.array(labels))
    return base.append_column("signature", pa.array(list(sig), pa.list_(pa.float32(), 32)))


def test_the_class_mean_filter_matches_a_direct_computation():
    table = _signed()
    ok = np.ones(table.num_rows, dtype=bool)
    f = coverage.row_filter(table, ok)
    assert f.by_class_means
    np.testing.assert_allclose(f.numbers["class_margin"], class_margin(table, ok), atol=1e-5)
    assert sorted(np.flatnonzero(f.set_aside("other_class"))) == [3, 125, 247]  # the flipped
    true = np.arange(300) % 3
    np.testing.assert_array_equal(f.numbers["nearer_class"][[3, 125, 247]], true[[3, 125, 247]])
    assert np.isnan(f.numbers["coverage_cap"]).all() and np.isnan(f.numbers["agreement_cut"]).all()


def test_set_aside_rows_go_last_and_the_rest_is_a_uniform_seeded_draw():
    table = _signed()
    ok = np.ones(table.num_rows, dtype=bool)
    values = coverage.coverage_ranking(table, ok, 0)
    aside = np.isin(np.arange(300), [3, 125, 247])
    assert values[aside].max() < 0 <= 2 < values[~aside].min()
    # The passing rows' order is the Gumbel noise's alone: τ and ‖g‖ do not weigh the draw.
    noise = coverage.gumbel_noise(table, 0)
    assert np.array_equal(np.argsort(values[~aside]), np.argsort(noise[~aside]))
    for keep in (0.2, 0.5):
        kept = set(select(table, keep=keep, scorer="sage-coverage")["__key__"].to_pylist())
        assert not kept & {f"k{i:03d}" for i in (3, 125, 247)}


def test_without_signatures_the_rule_before_applies():
    table = _signed()
    ok = np.ones(table.num_rows, dtype=bool)
    nulls = pa.array([None] * 300, pa.list_(pa.float32(), 32))
    unsigned = table.set_column(table.schema.get_field_index("signature"), "signature", nulls)
    for t in (unsigned, table.drop_columns(["signature"])):
        f = coverage.row_filter(t, ok)
        assert not f.by_class_means and np.isnan(f.numbers["class_margin"]).all()
        np.testing.assert_array_equal(
            coverage.coverage_ranking(t, ok, 0), coverage.coverage_ranking(_table(300).set_column(
                2, "label", t["label"]), ok, 0))  # fmt: skip


def test_the_class_means_are_the_same_over_any_parts_and_order():
    table = _signed(90, flipped=(1, 40, 77))
    table = table.set_column(1, "__shard__", pa.array([f"s{i % 4}.tar" for i in range(90)]))
    whole = select(table, keep=0.3, scorer="sage-coverage", seed=2)
    parts = {s: table.filter(pc.equal(table["__shard__"], s)) for s in ("s2.tar", "s0.tar",
                                                                         "s3.tar", "s1.tar")}  # fmt: skip
    got = select_parts(list(parts), local_map(parts.__getitem__), keep=0.3,
                       scorer="sage-coverage", seed=2, memory_rows=8)  # fmt: skip
    bounded = pa.concat_tables([part.kept for part in got]).sort_by("__key__")
    assert bounded["__key__"].equals(whole.sort_by("__key__")["__key__"])
    # The integer sums of disjoint parts add up to the whole table's, exactly.
    ok = np.ones(90, dtype=bool)
    top = coverage.part_sums(table, ok).top
    summed = coverage.classmeans.MeanSums()
    for part in parts.values():
        summed.add(coverage.mean_sums(part, np.ones(part.num_rows, dtype=bool), top))
    once = coverage.mean_sums(table, ok, top)
    assert summed.n == once.n and (summed.outer == once.outer).all()
    assert all((summed.total[c] == once.total[c]).all() for c in once.n)


def test_a_class_of_one_is_never_another_classes_mean_and_one_class_keeps_the_rule_before():
    table = _signed(31, flipped=())
    labels = np.arange(31) % 3
    labels[30] = 7  # a class of one sample
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    f = coverage.row_filter(table, np.ones(31, dtype=bool))
    assert not np.isin(f.numbers["nearer_class"], [7]).any()
    assert f.numbers["class_margin"][30] == 1.0  # its own mean is itself
    # One class (unlabeled data): no other class to be nearer to, so the rule before applies.
    one = table.set_column(table.schema.get_field_index("label"), "label", pa.array([0] * 31))
    assert not coverage.row_filter(one, np.ones(31, dtype=bool)).by_class_means


def test_signatures_that_do_not_separate_the_classes_fall_back_to_the_rule_before(caplog):
    # 300 signatures of one cloud under 10 random labels: most lie nearer another class's mean,
    # so the class means say nothing and the agreement and τ filter decides, on both paths.
    table = _signed(300, flipped=())
    labels = np.random.default_rng(1).integers(0, 10, 300)
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    sig = np.random.default_rng(2).normal(0, 1, (300, 32)).astype(np.float32)
    column = pa.array(list(sig), pa.list_(pa.float32(), 32))
    table = table.set_column(table.schema.get_field_index("signature"), "signature", column)
    ok = np.ones(300, dtype=bool)
    assert (class_margin(table, ok) < 0).mean() > coverage.MAX_SET_ASIDE
    assert not coverage.row_filter(table, ok).by_class_means
    unsigned = table.drop_columns(["signature"])
    whole = select(table, keep=0.3, scorer="sage-coverage")
    assert whole.equals(select(unsigned, keep=0.3, scorer="sage-coverage"))
    parts = {s: table.filter(pc.equal(table["__shard__"], s)) for s in ("a.tar", "b.tar")}
    got = select_parts(list(parts), local_map(parts.__getitem__), keep=0.3,
                       scorer="sage-coverage", seed=0, memory_rows=16)  # fmt: skip
    bounded = pa.concat_tables([part.kept for part in got]).sort_by("__key__")
    assert bounded["__key__"].equals(whole.sort_by("__key__")["__key__"])
    assert "do not separate the classes" in caplog.text
