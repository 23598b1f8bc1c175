"""The same samples, however they are stored, give the same sketch and scores (issues 24.1 and
26.1): tar in few or many shards, Parquet with and without a key column. Pass 1's groups and
merge tree follow the samples' content in their global order, not the shards.

Byte-identity needs the model to see the same batches: a batch never spans two shards, and a
CPU BLAS may round a row differently in a batch of another size. The layouts below cut shards
at multiples of the batch size, so every layout gives the model the same batches; one more
("tar-ragged") does not, and is held to the same kept set and scores equal to rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runs import output_files
from shardmaker import make_parquet_shard, make_tar_shard, npy_bytes
from tiny import blobs, key, train_checkpoint

import sage_stream

N = 600
OPTIONS = dict(model="tiny:mlp", ell=4, batch_size=8, device="cpu", progress=False)


def tar_set(folder: Path, x, y, sizes) -> list[str]:
    urls, start = [], 0
    for s, n in enumerate(sizes):
        samples = {key(i): {"npy": npy_bytes(x[i]), "cls": str(int(y[i])).encode()}
                   for i in range(start, start + n)}  # fmt: skip
        urls.append(make_tar_shard(folder / f"part-{s:03d}.tar", samples))
        start += n
    return urls


def parquet_set(folder: Path, x, y, sizes, keyed: bool) -> list[str]:
    urls, start = [], 0
    for s, n in enumerate(sizes):
        idx = range(start, start + n)
        columns = {"features": [x[i].tolist() for i in idx], "cls": [int(y[i]) for i in idx]}
        if keyed:
            columns = {"__key__": [key(i) for i in idx], **columns}
        urls.append(make_parquet_shard(folder / f"part-{s:03d}.parquet", pa.table(columns)))
        start += n
    return urls


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    x, _, noisy = blobs(N, seed=3)
    ckpt = train_checkpoint(root / "model.pt", x, noisy)
    sets = {
        "tar-3": tar_set(root / "tar3", x, noisy, [200, 200, 200]),
        "tar-uneven": tar_set(root / "tar8", x, noisy, [8, 96, 16, 152, 8, 96, 48, 176]),
        "parquet-keys": parquet_set(root / "pqk", x, noisy, [304, 296], keyed=True),
        "parquet-rows": parquet_set(root / "pq", x, noisy, [40, 264, 96, 200], keyed=False),
        "tar-ragged": tar_set(root / "tar9", x, noisy, [1, 90, 7, 150, 2, 100, 50, 190, 10]),
    }
    outs = {}
    for name, urls in sets.items():
        out = root / f"out-{name}"
        sage_stream.run(urls, out=str(out), checkpoint=ckpt, keep=0.3, **OPTIONS)
        outs[name] = out
    return outs


def scores_by_digest(out: Path) -> dict[int, tuple]:
    table = pq.read_table(out / "scores", columns=["digest", "score", "coverage", "loss"])
    rows = table.to_pylist()
    return {r["digest"]: (r["score"], r["coverage"], r["loss"]) for r in rows}


ALIGNED = ("tar-3", "tar-uneven", "parquet-keys", "parquet-rows")


def test_every_layout_gives_the_same_sketch(layouts):
    sketches = {name: output_files(layouts[name] / "sketch.zarr") for name in ALIGNED}
    for name, files in sketches.items():
        assert files == sketches["tar-3"], name


def test_every_layout_gives_the_same_scores(layouts):
    expected = scores_by_digest(layouts["tar-3"])
    assert len(expected) == N  # one digest per sample: the samples are all different
    for name in ALIGNED:
        assert scores_by_digest(layouts[name]) == expected, name
    ragged = scores_by_digest(layouts["tar-ragged"])
    assert ragged.keys() == expected.keys()
    for digest, values in expected.items():
        assert ragged[digest] == pytest.approx(values, rel=1e-4, abs=1e-6)


def test_the_groups_were_many(layouts):
    """With ℓ = 4 a group is ~32 samples: the runs above merged ~19 groups, on two levels."""
    import zarr

    stats = zarr.open_group(str(layouts["tar-3"] / "sketch.zarr"), mode="r").attrs["stats"]
    assert stats["n"] == N and stats["delta"] > 0
    digests = np.array(list(scores_by_digest(layouts["tar-3"])), dtype=np.int64)
    from sage_stream.passes.groups import boundary_level, group_rows

    levels = [boundary_level(int(d), group_rows(4)) for d in digests]
    assert sum(lv > 0 for lv in levels) >= 8


def kept_digests(out: Path) -> set[int]:
    scores = pq.read_table(out / "scores", columns=["__shard__", "__key__", "digest"]).to_pylist()
    digest = {(r["__shard__"], r["__key__"]): r["digest"] for r in scores}
    kept = pq.read_table(out / "selection.parquet", columns=["__shard__", "__key__"]).to_pylist()
    return {digest[(r["__shard__"], r["__key__"])] for r in kept}


def test_every_layout_keeps_the_same_samples(layouts):
    """The default scorer's seeded draw is keyed by the samples' content, not their keys: Parquet
    without a key column (keys are row numbers per file) keeps what tar keeps."""
    expected = kept_digests(layouts["tar-3"])
    assert len(expected) == round(0.3 * N)
    for name, out in layouts.items():
        assert kept_digests(out) == expected, name


def test_the_random_draw_is_the_same_for_every_layout(layouts):
    kept = {}
    for name, out in layouts.items():
        sage_stream.select(out=str(out), keep=0.25, scorer="random")
        kept[name] = kept_digests(out)
    for name, digests in kept.items():
        assert digests == kept["tar-3"], name
