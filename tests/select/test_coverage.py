"""The sage-coverage ranking: the noisy pool easy first, else its filter and its seeded
weighted draw; its errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

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


def _with_loss(table: pa.Table, loss: np.ndarray) -> pa.Table:
    return table.set_column(table.schema.get_field_index("loss"), "loss", pa.array(loss))


@pytest.fixture
def noisy_switch_on(monkeypatch):
    """The noisy-pool switch, measured and off by default (NOISY_SHARE = 1.0), at 0.25."""
    monkeypatch.setattr(coverage, "NOISY_SHARE", 0.25)


def test_the_noisy_switch_is_off_by_default():
    loss = np.full(40, 0.9)  # every candidate unfit: still the rule for a clean pool
    ok = np.ones(40, dtype=bool)
    got = coverage.coverage_ranking(_with_loss(_table(40), loss), ok, 0)
    assert np.array_equal(got, coverage.coverage_ranking(_table(40), ok, 0))
    assert not coverage.is_noisy(40, 40)


@pytest.mark.usefixtures("noisy_switch_on")
def test_a_pool_more_than_a_quarter_unfit_is_ranked_easy_first():
    n = 40
    loss = np.linspace(0.0, 0.04, n)
    loss[:10] = np.linspace(0.06, 2.0, 10)  # 10 of 40 unfit: exactly a quarter, not noisy
    ok = np.ones(n, dtype=bool)
    quarter = coverage.coverage_ranking(_with_loss(_table(n), loss), ok, 0)
    assert np.array_equal(quarter, coverage.coverage_ranking(_table(n), ok, 0))  # loss unused
    loss[10] = 0.0500001  # 11 of 40: noisy
    noisy = _with_loss(_table(n), loss)
    values = coverage.coverage_ranking(noisy, ok, 0)
    np.testing.assert_allclose(values, 3.0 - loss / (1.0 + loss))
    for keep in (0.1, 0.3, 0.5):  # the same rows as loss-easy, whatever the seed
        easy = select(noisy, keep=keep, scorer="loss-easy")["__key__"]
        for seed in (0, 1):
            assert select(noisy, keep=keep, scorer="sage-coverage", seed=seed)["__key__"].equals(
                easy
            )


@pytest.mark.usefixtures("noisy_switch_on")
def test_noisy_is_decided_over_all_parts_by_the_bounded_path():
    # Shard a.tar alone is clean (2 of 20 unfit), b.tar alone noisy: together 12 of 40 unfit.
    n = 40
    loss = np.full(n, 0.01)
    loss[[0, 1]] = 0.5
    loss[30:40] = 0.9
    table = _with_loss(_table(n), loss)
    parts = {s: table.filter(pc.equal(table["__shard__"], s)) for s in ("a.tar", "b.tar")}
    got = select_parts(sorted(parts), local_map(parts.__getitem__), keep=0.3,
                       scorer="sage-coverage", seed=0, memory_rows=4)  # fmt: skip
    bounded = pa.concat_tables([part.kept for part in got])
    assert bounded.equals(select(table, keep=0.3, scorer="sage-coverage", seed=0))
    assert bounded["__key__"].equals(select(table, keep=0.3, scorer="loss-easy")["__key__"])
    assert coverage.is_noisy(11, 40) and not coverage.is_noisy(10, 40)
