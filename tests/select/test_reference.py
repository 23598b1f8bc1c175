"""Select: quotas, rankings, tie-breaks and order independence, against a slow reference."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
from runs import SCORES_SCHEMA

from sage_stream.errors import InputError
from sage_stream.select.orderings import ranking_values
from sage_stream.select.quotas import equal_quotas, proportional_quotas
from sage_stream.select.reference import select
from sage_stream.select.rules import BALANCES, SCORERS


def make_table(labels, scores, *, status=None, keys=None, shards=None, loss=None, grad_norm=None):
    n = len(labels)
    cols = {
        "__key__": keys or [f"k{i:03d}" for i in range(n)],
        "__shard__": shards or ["s0"] * n,
        "label": labels,
        "status": status or ["ok"] * n,
        "score": scores,
        "loss": loss or [float(i) for i in range(n)],
        "grad_norm": grad_norm or [float(n - i) for i in range(n)],
        "coverage": [0.05 + (7 * i % 13) / 13 for i in range(n)],
    }
    return pa.table(cols, schema=SCORES_SCHEMA)


def kept_keys(out: pa.Table) -> list[str]:
    return out["__key__"].to_pylist()


def shuffled(table: pa.Table, seed: int) -> pa.Table:
    order = np.random.default_rng(seed).permutation(len(table))
    return table.take(order)


def reference_select(table: pa.Table, keep: float, balance: str, scorer: str, seed: int = 0):
    """Slow, obvious reference: sort each class's rows in Python and take its quota."""
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    values = dict(
        zip(range(len(rows)), ranking_values(table, scorer, seed)[_ok(table)], strict=True)
    )
    classes: dict = {}
    for i, r in enumerate(rows):
        classes.setdefault(None if balance == "none" else r["label"], []).append(i)
    if balance == "none":
        quotas = {None: int(keep * len(rows) + 0.5 + 1e-9)}
    else:
        counts = {c: len(ix) for c, ix in classes.items()}
        quota_of = proportional_quotas if balance == "proportional" else equal_quotas
        quotas = quota_of(counts, keep)
    kept = []
    for c, ix in classes.items():
        ix.sort(key=lambda i: (-values[i], rows[i]["__key__"], rows[i]["__shard__"]))
        kept += [rows[i] for i in ix[: quotas[c]]]
    kept.sort(key=lambda r: (r["__shard__"], r["__key__"]))
    return [(r["__shard__"], r["__key__"]) for r in kept]


def _ok(table):
    return np.array([s == "ok" for s in table["status"].to_pylist()])


# --- quotas ----------------------------------------------------------------------------------


def test_proportional_quotas_hand_example():
    # 2.5, 1.5, 1.0 → floors 2, 1, 1; one unit left; remainders tie at .5 → smaller label.
    assert proportional_quotas({0: 5, 1: 3, 2: 2}, 0.5) == {0: 3, 1: 1, 2: 1}
    # 0.3 · 10 is exactly 3 despite float error; 0.3 · 7 = 2.1, 0.3 · 3 = 0.9 → largest is 0.9.
    assert proportional_quotas({0: 10}, 0.3) == {0: 3}
    assert proportional_quotas({0: 7, 1: 3}, 0.3) == {0: 2, 1: 1}


@pytest.mark.parametrize("keep", [0.01, 0.1, 0.25, 0.3, 0.333, 0.5, 0.7, 0.99, 1.0])
def test_proportional_quotas_sum_to_rounded_total(keep):
    rng = random.Random(7)
    for _ in range(50):
        counts = {c: rng.randint(0, 40) for c in range(rng.randint(1, 6))}
        quotas = proportional_quotas(counts, keep)
        n = sum(counts.values())
        assert sum(quotas.values()) == int(keep * n + 0.5 + 1e-9)
        for c, n_c in counts.items():
            assert 0 <= quotas[c] <= n_c
            assert abs(quotas[c] - keep * n_c) < 1  # class mix preserved to within one sample


def test_equal_quotas_hand_examples():
    # T = 3 · ⌊9/3⌋ = 9; class 1 gives all 2; L = 3; one unit left → class 0 (smaller label).
    assert equal_quotas({0: 10, 1: 2, 2: 6}, 0.5) == {0: 4, 1: 2, 2: 3}
    # No small class: ⌊f·N/C⌋ each.
    assert equal_quotas({0: 10, 1: 10, 2: 10}, 0.4) == {0: 4, 1: 4, 2: 4}
    # T = 3 · ⌊16.5/3⌋ = 15; two small classes give all; the big one takes the other 12.
    assert equal_quotas({0: 1, 1: 2, 2: 30}, 0.5) == {0: 1, 1: 2, 2: 12}
    # keep=1: the budget is C · ⌊N/C⌋, which may be below N.
    assert equal_quotas({0: 3, 1: 2}, 1.0) == {0: 2, 1: 2}
    assert equal_quotas({}, 0.5) == {}


def test_equal_quotas_are_water_filling():
    rng = random.Random(3)
    for _ in range(200):
        counts = {c: rng.randint(0, 25) for c in range(rng.randint(1, 5))}
        keep = rng.choice([0.1, 0.3, 0.5, 0.8, 1.0])
        quotas = equal_quotas(counts, keep)
        n, k = sum(counts.values()), len(counts)
        assert sum(quotas.values()) == k * int(keep * n / k + 1e-9)
        assert all(0 <= quotas[c] <= counts[c] for c in counts)
        # Classes not taking all their samples differ by at most one unit.
        capped = [quotas[c] for c in counts if quotas[c] < counts[c]]
        assert not capped or max(capped) - min(capped) <= 1
        # A class that gives all is no bigger than a capped share (+1 for a leftover unit).
        assert not capped or all(
            counts[c] <= min(capped) + 1 for c in counts if quotas[c] == counts[c]
        )


# --- select ----------------------------------------------------------------------------------


def test_proportional_preserves_class_mix():
    labels = [0] * 6 + [1] * 4
    scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.5, 0.6, 0.4, 0.0]
    out = select(make_table(labels, scores), keep=0.5)
    assert out.schema.names == ["__key__", "__shard__", "label", "score"]
    assert out["label"].to_pylist().count(0) == 3
    assert out["label"].to_pylist().count(1) == 2
    assert kept_keys(out) == ["k000", "k002", "k004", "k006", "k007"]


def test_equal_small_class_gives_all_and_redistributes():
    labels = [0] * 10 + [1] * 2 + [2] * 6
    scores = [i / 100 for i in range(18)]
    out = select(make_table(labels, scores), keep=0.5, balance="equal")
    counts = {c: out["label"].to_pylist().count(c) for c in (0, 1, 2)}
    assert counts == {0: 4, 1: 2, 2: 3}
    # Within class 0 the four best are its last four rows.
    assert [k for k, c in zip(kept_keys(out), out["label"].to_pylist(), strict=True) if c == 0] == [
        "k006",
        "k007",
        "k008",
        "k009",
    ]


def test_none_is_global_top():
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3]
    out = select(make_table(labels, scores), keep=0.5, balance="none")
    assert kept_keys(out) == ["k000", "k001", "k002"]


def test_min_score_threshold_ignores_balance():
    scores = [0.5, -0.2, 0.1, 0.1000001, 0.9]
    table = make_table([0, 0, 1, 1, 1], scores)
    for balance in BALANCES:
        assert kept_keys(select(table, min_score=0.1, balance=balance)) == [
            "k000",
            "k002",
            "k003",
            "k004",
        ]


def test_ties_broken_by_key_then_shard():
    table = make_table(
        [0] * 4,
        [0.5] * 4,
        keys=["b", "a", "a", "c"],
        shards=["s1", "s1", "s0", "s0"],
    )
    out = select(table, keep=0.5, balance="none")
    # Key "a" wins both places; within it shard s0 comes first; output sorted by shard then key.
    assert list(zip(out["__shard__"].to_pylist(), kept_keys(out), strict=True)) == [
        ("s0", "a"),
        ("s1", "a"),
    ]


def test_independent_of_row_order():
    rng = np.random.default_rng(0)
    n = 200
    table = make_table(
        rng.integers(0, 4, n).tolist(),
        np.round(rng.normal(size=n), 1).tolist(),  # many ties
        status=rng.choice(["ok", "ok", "ok", "error"], n).tolist(),
        shards=[f"s{i % 3}" for i in range(n)],
    )
    for scorer in SCORERS:
        for balance in BALANCES:
            expected = select(table, keep=0.37, balance=balance, scorer=scorer)
            for seed in range(3):
                assert select(
                    shuffled(table, seed), keep=0.37, balance=balance, scorer=scorer
                ).equals(expected)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("balance", BALANCES)
@pytest.mark.parametrize("keep", [0.05, 0.3, 0.5, 1.0])
def test_matches_slow_reference(scorer, balance, keep):
    rng = np.random.default_rng(1)
    n = 150
    table = make_table(
        rng.choice([0, 1, 1, 2, 2, 2, 2, 5], n).tolist(),
        np.round(rng.normal(size=n), 1).tolist(),
        status=rng.choice(["ok", "ok", "error"], n).tolist(),
        shards=rng.choice(["a", "b"], n).tolist(),
        loss=np.round(rng.exponential(size=n), 1).tolist(),
        grad_norm=np.round(rng.exponential(size=n), 1).tolist(),
    )
    out = select(table, keep=keep, balance=balance, scorer=scorer, seed=5)
    got = list(zip(out["__shard__"].to_pylist(), kept_keys(out), strict=True))
    assert got == reference_select(table, keep, balance, scorer, seed=5)


def test_error_rows_never_kept():
    table = make_table([0, 0, 1, 1], [9.0, 0.1, 9.0, 0.2], status=["error", "ok", None, "ok"])
    assert kept_keys(select(table, keep=1.0)) == ["k001", "k003"]
    assert kept_keys(select(table, min_score=-1.0)) == ["k001", "k003"]


def test_keep_one_keeps_every_candidate():
    table = make_table([0, 1, 1, None, 2], [0.1, 0.2, 0.3, 0.4, 0.5], status=["ok"] * 4 + ["error"])
    assert len(select(table, keep=1.0, balance="none")) == 4
    assert len(select(table.slice(0, 3), keep=1.0)) == 3


def test_output_sorted_by_shard_then_key_with_scorer_source():
    table = make_table(
        [0] * 4,
        [0.4, 0.3, 0.2, 0.1],
        keys=["z", "a", "m", "b"],
        shards=["s2", "s10", "s2", "s10"],
        loss=[1.0, 2.0, 3.0, 4.0],
    )
    out = select(table, keep=1.0, scorer="loss-easy")
    assert list(zip(out["__shard__"].to_pylist(), kept_keys(out), strict=True)) == [
        ("s10", "a"),
        ("s10", "b"),
        ("s2", "m"),
        ("s2", "z"),
    ]
    assert out["score"].to_pylist() == [2.0, 4.0, 3.0, 1.0]  # the loss, not its negation
    assert out.schema.field("label").type == pa.int64()


def test_empty_and_all_error_tables():
    table = make_table([0, 1], [0.1, 0.2], status=["error", "error"])
    for balance in BALANCES:
        assert len(select(table, keep=0.5, balance=balance)) == 0
    assert len(select(table.slice(0, 0), keep=0.5)) == 0


# --- scorers ---------------------------------------------------------------------------------


def test_scorers_rank_the_right_way():
    table = make_table(
        [0, 0, 0],
        [0.2, 0.9, 0.1],
        loss=[5.0, 1.0, 3.0],
        grad_norm=[0.5, 2.0, 7.0],
    )
    assert kept_keys(select(table, keep=0.34, scorer="sage")) == ["k001"]
    assert kept_keys(select(table, keep=0.34, scorer="loss")) == ["k000"]  # hardest
    assert kept_keys(select(table, keep=0.34, scorer="loss-easy")) == ["k001"]  # easiest
    assert kept_keys(select(table, keep=0.34, scorer="grad-norm")) == ["k002"]
    np.testing.assert_array_equal(ranking_values(table, "loss-easy"), [-5.0, -1.0, -3.0])


def test_random_scorer_seeded_and_order_independent():
    table = make_table([0] * 50, [0.0] * 50, shards=[f"s{i % 2}" for i in range(50)])
    a = ranking_values(table, "random", seed=1)
    assert ((a >= 0) & (a < 1)).all() and len(set(a.tolist())) == 50
    np.testing.assert_array_equal(a, ranking_values(table, "random", seed=1))
    assert not np.array_equal(a, ranking_values(table, "random", seed=2))
    # Each row's value depends on its own shard and key only, not on order or other rows.
    order = np.random.default_rng(0).permutation(50)[:20]
    np.testing.assert_array_equal(ranking_values(table.take(order), "random", seed=1), a[order])
    out = select(table, keep=0.2, balance="none", scorer="random", seed=1)
    assert len(out) == 10 and min(out["score"].to_pylist()) >= np.sort(a)[-10]
    assert kept_keys(out) != kept_keys(
        select(table, keep=0.2, balance="none", scorer="random", seed=2)
    )


# --- invalid input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"keep": 0.5, "min_score": 0.1},
        {"keep": 0.0},
        {"keep": 1.5},
        {"keep": -0.1},
        {"keep": float("nan")},
        {"keep": True},
        {"keep": "0.5"},
        {"min_score": float("nan")},
        {"keep": 0.5, "balance": "classes"},
        {"keep": 0.5, "scorer": "el2n"},
    ],
)
def test_invalid_arguments_raise_input_error(kwargs):
    with pytest.raises(InputError):
        select(make_table([0, 1], [0.1, 0.2]), **kwargs)


def test_unknown_choice_lists_choices():
    with pytest.raises(InputError, match="sage, loss, loss-easy, grad-norm, random"):
        ranking_values(make_table([0], [0.1]), "el2n")


def test_null_labels_need_balance_none():
    table = make_table([0, None, 1], [0.1, 0.2, 0.3])
    for balance in ("proportional", "equal"):
        with pytest.raises(InputError, match="--balance none"):
            select(table, keep=0.5, balance=balance)
    out = select(table, keep=0.5, balance="none")
    assert kept_keys(out) == ["k001", "k002"] and out["label"].to_pylist() == [None, 1]


def test_candidate_missing_value_raises():
    table = make_table([0, 0], [0.1, None], status=["ok", "ok"])
    with pytest.raises(InputError, match="'score'"):
        select(table, keep=0.5)
    errored = make_table([0, 0], [0.1, None], status=["ok", "error"])
    assert kept_keys(select(errored, keep=1.0)) == ["k000"]  # null on an error row is fine


def test_missing_column_and_duplicate_key_raise():
    with pytest.raises(InputError, match="grad_norm"):
        select(make_table([0], [0.1]).drop_columns(["grad_norm"]), keep=0.5)
    with pytest.raises(InputError, match="'k'"):
        select(make_table([0, 0], [0.1, 0.2], keys=["k", "k"]), keep=0.5)
