"""Every reader works on every output (issue 26.4): the emitted shards of tar, gzipped tar and
Parquet inputs, read with webdataset, wids (through shardindex.json), pyarrow, Hugging Face
`datasets` and Ray Data, each giving exactly the kept samples.

wids memory-maps plain tar, so shardindex.json lists the plain tar shards only and names the
gzipped ones under `not_listed` (before, it listed them and wids failed with
UnicodeDecodeError on the gzip bytes).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shardmaker import tar_bytes, write_bytes
from tiny import blobs, key, npy_bytes, train_checkpoint, write_parquet_set

import sage_stream

OPTIONS = {"model": "tiny:mlp", "keep": 0.5, "ell": 8, "device": "cpu", "progress": False,
           "loader_workers": 0}  # fmt: skip
N = 60


def _tar_samples(x, y, idx) -> dict:
    return {key(i): {"npy": npy_bytes(x[i]), "cls": str(int(y[i])).encode()} for i in idx}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """OUT of a run on: plain tar shards, a plain and a gzipped tar shard, Parquet shards."""
    root = tmp_path_factory.mktemp("readers")
    x, _, noisy = blobs(N)
    ckpt = train_checkpoint(root / "p.pt", x, noisy)
    halves = [range(0, N // 2), range(N // 2, N)]
    plain = [write_bytes(root / "tar" / f"s-{h}.tar", tar_bytes(_tar_samples(x, noisy, idx)))
             for h, idx in enumerate(halves)]  # fmt: skip
    mixed = [
        write_bytes(root / "mixed" / "s-0.tar", tar_bytes(_tar_samples(x, noisy, halves[0]))),
        write_bytes(root / "mixed" / "s-1.tgz",
                    gzip.compress(tar_bytes(_tar_samples(x, noisy, halves[1])), mtime=0)),
    ]  # fmt: skip
    parquet = write_parquet_set(root / "parquet", x, noisy, shards=2)
    outs = {}
    for name, inputs, extra in [("tar", plain, {}), ("mixed", mixed, {}),
                                ("parquet", parquet, {"label_key": "label"})]:  # fmt: skip
        outs[name] = root / f"out-{name}"
        sage_stream.run(inputs, out=str(outs[name]), checkpoint=ckpt, **OPTIONS, **extra)
    return outs


def kept(out: Path) -> set[str]:
    return set(pq.read_table(out / "selection.parquet", columns=["__key__"])["__key__"].to_pylist())


def shards(out: Path) -> list[str]:
    return sorted(str(p) for p in (out / "shards").iterdir())


@pytest.mark.parametrize("name", ["tar", "mixed"])
def test_webdataset_reads_plain_and_gzipped_outputs(runs, name):
    webdataset = pytest.importorskip("webdataset")
    out = runs[name]
    samples = list(webdataset.WebDataset(shards(out), shardshuffle=False, empty_check=False))
    assert {s["__key__"] for s in samples} == kept(out)
    assert all(json.loads(s["sage.json"])["score"] is not None for s in samples)


def test_wids_reads_what_shardindex_lists(runs, tmp_path):
    wids = pytest.importorskip("wids")
    out = runs["mixed"]
    index = json.loads((out / "shardindex.json").read_text())
    assert [s["url"] for s in index["shardlist"]] == ["shards/s-0.tar"]
    assert [(s["url"], s["why"]) for s in index["not_listed"]] == [
        ("shards/s-1.tgz", "gzip: wids reads plain tar only")
    ]
    gzipped = webdataset_keys(out / "shards" / "s-1.tgz")
    for name in ("tar", "mixed"):
        dataset = wids.ShardListDataset(
            str(runs[name] / "shardindex.json"), cache_dir=str(tmp_path / name), transformations=[]
        )
        keys = {dataset[i]["__key__"] for i in range(len(dataset))}
        expected = kept(runs[name]) - (gzipped if name == "mixed" else set())
        assert keys == expected and len(keys) > 0
        dataset.close()


def webdataset_keys(path: Path) -> set[str]:
    webdataset = pytest.importorskip("webdataset")
    return {s["__key__"] for s in webdataset.WebDataset(str(path), shardshuffle=False)}


def test_pyarrow_reads_parquet_outputs_selection_and_scores(runs):
    out = runs["parquet"]
    table = pq.read_table(shards(out))
    assert set(table["__key__"].to_pylist()) == kept(out)
    assert {"features", "label", "note", "sage_score"} <= set(table.column_names)
    assert pq.read_table(out / "scores").num_rows == N


def test_datasets_reads_parquet_and_webdataset_outputs(runs, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = runs["parquet"]
    table = datasets.load_dataset("parquet", data_files=shards(out), split="train",
                                  cache_dir=str(tmp_path / "hf"))  # fmt: skip
    assert set(table["__key__"]) == kept(out)
    out = runs["tar"]
    tars = datasets.load_dataset("webdataset", data_files=shards(out), split="train",
                                 cache_dir=str(tmp_path / "hf-tar"))  # fmt: skip
    assert set(tars["__key__"]) == kept(out)


@pytest.fixture
def ray_local(ray_cluster):
    """The session's cluster (conftest), as in the Ray executor's tests."""
    return pytest.importorskip("ray")


@pytest.mark.ray
def test_ray_data_reads_tar_gzipped_tar_and_parquet_outputs(runs, ray_local):
    data = ray_local.data
    for name in ("tar", "mixed"):
        rows = data.read_webdataset(shards(runs[name]), decoder=None).take_all()
        assert {r["__key__"] for r in rows} == kept(runs[name])
    rows = data.read_parquet(shards(runs["parquet"])).take_all()
    assert {r["__key__"] for r in rows} == kept(runs["parquet"])
