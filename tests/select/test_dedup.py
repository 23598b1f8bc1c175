"""Near-copy removal (select/dedup.py) against direct computations on small tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sage_stream.errors import InputError
from sage_stream.outputs.tables import SCORE_SCHEMA
from sage_stream.select import dedup
from sage_stream.select.bounded import select_parts
from sage_stream.select.parts import local_map

SIG = SCORE_SCHEMA.field("signature").type


def planted(seed: int = 0, originals: int = 60, copies: int = 4, classes: int = 3):
    """Distinct signatures plus tight near-copies of some; keys shuffled over 4 shards.
    Returns the table and, per row, the id of its original."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(originals, 32))
    label = rng.integers(0, classes, originals)
    copied = rng.choice(originals, originals // 4, replace=False)
    source = np.concatenate([np.arange(originals), np.repeat(copied, copies)])
    sig = base[source] + rng.normal(scale=1e-3, size=(len(source), 32)) * (source >= 0)[:, None]
    order = rng.permutation(len(source))
    source, sig = source[order], sig[order]
    n = len(source)
    table = pa.table({
        "__key__": [f"k{i:04d}" for i in rng.permutation(n)],
        "__shard__": [f"s{i % 4}" for i in range(n)],
        "label": label[source].tolist(), "status": ["ok"] * n,
        "score": np.zeros(n), "loss": np.zeros(n), "grad_norm": np.ones(n),
        "signature": pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel(), pa.float32()), 32),
    })  # fmt: skip
    return table, source


def parts_of(table: pa.Table) -> dict[str, pa.Table]:
    return {s: table.filter(pc.equal(table["__shard__"], s))
            for s in sorted(set(table["__shard__"].to_pylist()))}  # fmt: skip


def found(table: pa.Table, **kwargs) -> pa.Table:
    parts = parts_of(table)
    got = list(dedup.find_duplicates(list(parts), local_map(parts.__getitem__), **kwargs))
    out = pa.concat_tables(got) if got else dedup.DUPLICATES_SCHEMA.empty_table()
    return out.sort_by([("__shard__", "ascending"), ("__key__", "ascending")])


def exact_groups(table: pa.Table, epsilon: float) -> dict[str, str]:
    """Direct computation: every pair within a class against ε · mean pair distance, by an
    exact pairwise search; the greedy rule in (key, shard) order on that matrix."""
    sig = np.array(table["signature"].to_pylist(), dtype=np.float64)
    labels = np.array(table["label"].to_pylist())
    keys = np.array(table["__key__"].to_pylist())
    out = {}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.argsort(keys[idx])]
        s = sig[idx]
        dist = ((s[:, None, :] - s[None, :, :]) ** 2).sum(axis=2)  # (m, m) every pair
        threshold = epsilon * dist.sum() / (len(s) * len(s))  # mean over ordered pairs = 2 v_c
        reps: list[int] = []
        for i in range(len(s)):
            near = [j for j in reps if dist[i, j] <= threshold]
            if near:
                out[keys[idx[i]]] = keys[idx[min(near, key=lambda j: (dist[i, j], j))]]
            else:
                reps.append(i)
    return out


def test_threshold_is_epsilon_times_the_mean_squared_distance_of_a_pair():
    table, _ = planted()
    stats = dedup.stats_part(table)
    sig = np.array(table["signature"].to_pylist(), dtype=np.float64)
    labels = np.array(table["label"].to_pylist())
    for c in stats.n:
        s = sig[labels == c]
        pairs = ((s[:, None] - s[None]) ** 2).sum(axis=2).mean()
        assert stats.threshold(c, 0.01) == pytest.approx(0.01 * pairs, rel=1e-9)


def test_groups_equal_an_exact_pairwise_search_and_the_planted_copies():
    table, source = planted()
    got = found(table)
    pairs = dict(zip(got["__key__"].to_pylist(), got["duplicate_of_key"].to_pylist(), strict=True))
    assert pairs == exact_groups(table, dedup.COPY_EPSILON)
    keys = table["__key__"].to_pylist()
    origin = dict(zip(keys, source.tolist(), strict=True))
    first = {}
    for key in sorted(keys):  # the first of each original's copies, in key order, stays
        first.setdefault(origin[key], key)
    assert pairs == {k: first[origin[k]] for k in keys if first[origin[k]] != k}


def test_buckets_and_batches_find_the_same_tight_copies_whatever_the_row_order():
    table, _ = planted(seed=1, originals=200)
    whole = found(table)
    split = found(table, bucket_rows=20, memory_rows=30)  # several planes, several batches
    assert split.equals(whole)
    shuffled = table.take(np.random.default_rng(5).permutation(table.num_rows))
    assert found(shuffled).equals(whole)


def test_duplicates_rank_after_every_other_candidate_of_their_class():
    table, source = planted(seed=2)
    parts = parts_of(table)
    with dedup.Duplicates(dedup.find_duplicates(list(parts), local_map(parts.__getitem__))) as d:
        assert d.count > 0
        kept = pa.concat_tables(
            p.kept
            for p in select_parts(
                list(parts), local_map(parts.__getitem__), keep=0.25, scorer="random", duplicates=d
            )  # fmt: skip
        )
        removed = set(pa.concat_tables(d.tables())["__key__"].to_pylist())
    assert not removed & set(kept["__key__"].to_pylist())  # every class has enough others


def test_scores_without_signatures_are_a_clear_error():
    table, _ = planted()
    with pytest.raises(InputError, match="signature"):
        found(table.drop_columns(["signature"]))
    nulls = table.set_column(table.schema.get_field_index("signature"), "signature",
                             pa.nulls(table.num_rows, SIG))  # fmt: skip
    with pytest.raises(InputError, match="--dedup off"):
        found(nulls)


def test_a_part_without_candidates_is_no_error():
    # a shard of error rows only (or none at all) has no candidates: reshape(0, -1) once
    # raised a bare ValueError there
    table, _ = planted()
    parts = parts_of(table)
    errors = parts["s1"].set_column(
        parts["s1"].schema.get_field_index("status"), "status",
        pa.array(["error"] * parts["s1"].num_rows),
    )  # fmt: skip
    parts = {**parts, "s1": errors, "s9": parts["s2"].slice(0, 0)}
    got = list(dedup.find_duplicates(list(parts), local_map(parts.__getitem__)))
    rows = pa.concat_tables(got) if got else dedup.DUPLICATES_SCHEMA.empty_table()
    assert "s1" not in set(rows["__shard__"].to_pylist())
    assert rows.num_rows > 0  # the other shards' copies are still found
