"""The training feed: kept samples from emitted or original shards, split without duplicates."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from shardmaker import make_tar_shard, npy_bytes
from tiny import blobs, key, train_checkpoint, write_parquet_set, write_tar_set
from torch.utils.data import DataLoader

import sage_stream
from sage_stream.errors import InputError, ShardError
from sage_stream.feed import (
    SelectedDataset,
    assigned,
    attach_scores,
    filter_selected,
    kept_records,
    node_of,
    selected_samples,
)

ROOT = Path(__file__).resolve().parents[2]
N, SHARDS = 120, 5
OPTIONS = dict(model="tiny:mlp", ell=16, batch_size=32, device="cpu", keep=0.5, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: intra-op threads only contend (13 s -> 0.6 s for `data`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("feed")
    x, _, noisy = blobs(N)
    ckpt = train_checkpoint(root / "proxy.pt", x, noisy)
    tar = write_tar_set(root / "tar", x, noisy, shards=SHARDS)
    parquet = write_parquet_set(root / "pq", x, noisy, shards=SHARDS)
    sage_stream.run(tar, out=str(root / "tar-out"), checkpoint=ckpt, **OPTIONS)
    pq_options = {**OPTIONS, "scorer": "loss", "input_key": "features", "label_key": "label"}
    sage_stream.run(parquet, out=str(root / "pq-out"), checkpoint=ckpt, **pq_options)
    return {"x": x, "noisy": noisy, "tar": tar, "root": root, "ckpt": ckpt}


def out_of(data, fmt: str) -> str:
    return str(data["root"] / f"{fmt}-out")


def without_url(samples) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in samples]


def scores_by_key(out: str) -> dict[str, dict]:
    rows = {}
    for part in sorted(Path(out, "scores").glob("part-*.parquet")):
        rows.update({r["__key__"]: r for r in pq.read_table(part).to_pylist()})
    return rows


def selection(out: str) -> list[tuple[str, str]]:
    table = pq.read_table(Path(out, "selection.parquet"))
    return list(zip(table["__shard__"].to_pylist(), table["__key__"].to_pylist(), strict=True))


@pytest.mark.parametrize("fmt", ["tar", "pq"])
def test_emitted_and_original_sources_yield_the_same_kept_samples(data, fmt):
    out = out_of(data, fmt)
    emitted = list(selected_samples(out))
    original = list(selected_samples(out, original=True))
    assert without_url(emitted) == without_url(original)
    assert sorted((s["__shard__"], s["__key__"]) for s in emitted) == selection(out)
    assert all("/shards/" in s["__url__"] for s in emitted)
    assert all("/shards/" not in s["__url__"] for s in original)
    scores = scores_by_key(out)
    scorer = "sage-coverage" if fmt == "tar" else "loss"
    for s in emitted:
        row = scores[s["__key__"]]
        assert s["sage"]["scorer"] == scorer and s["sage"]["label"] == row["label"]
        assert s["sage"]["loss"] == row["loss"] and s["sage"]["energy"] == row["energy"]
        assert not any(k.startswith("sage_") or k == "sage.json" for k in s)


def test_tar_samples_carry_the_original_bytes(data):
    i = int(next(selected_samples(out_of(data, "tar")))["__key__"][1:])
    first = next(selected_samples(out_of(data, "tar")))
    assert (
        first["npy"] == npy_bytes(data["x"][i]) and first["cls"] == str(data["noisy"][i]).encode()
    )


def test_dataset_decodes_with_the_runs_keys_and_gives_the_ranked_score(data):
    for fmt, column in (("tar", "score"), ("pq", "loss")):
        out = out_of(data, fmt)
        scores = scores_by_key(out)
        items = list(SelectedDataset(out))
        keys = [k for _, k in selection(out)]
        assert len(items) == len(keys) == SelectedDataset(out).num_samples == N // 2
        by_label = {}
        for x, label, score in items:
            i = int(np.flatnonzero((data["x"] == x.numpy()).all(1))[0])
            assert label == data["noisy"][i] and score == pytest.approx(scores[key(i)][column])
            by_label[key(i)] = label
        assert sorted(by_label) == sorted(keys)


def key_of(sample: dict) -> tuple[str, str]:
    return sample["__shard__"], sample["__key__"]


def union_over(out: str, world: int, workers: int, **kw) -> list[tuple[str, str]]:
    got = []
    for rank in range(world):
        ds = SelectedDataset(out, decode=key_of, rank=rank, world_size=world, **kw)
        ds.set_epoch(kw.get("seed", 0) + 1)
        got += [tuple(k) for k in DataLoader(ds, batch_size=None, num_workers=workers)]
    return got


@pytest.mark.parametrize("original", [False, True])
def test_nodes_and_workers_yield_every_kept_sample_exactly_once(data, original):
    out = out_of(data, "tar")
    expected = selection(out)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*worker processes in total.*")
        for world in (1, 2, 3):
            for workers in (0, 1, 2, 3):  # up to 9 readers for 5 shards
                got = union_over(out, world, workers, original=original, shuffle=True)
                assert sorted(got) == expected, (world, workers)  # no gaps, no duplicates


def test_assigned_splits_items_into_disjoint_complete_parts():
    items = list(range(7))
    for world in (1, 2, 3):
        for workers in (1, 2, 3, 4):
            parts = [
                assigned(items, r, world, w, workers) for r in range(world) for w in range(workers)
            ]
            assert sorted(i for p in parts for i in p) == items
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shuffle_is_the_same_on_every_node_and_changes_with_the_epoch(data):
    out = out_of(data, "tar")

    def order(epoch: int, shuffle: bool = True) -> list[str]:
        ds = SelectedDataset(out, shuffle=shuffle, seed=3)
        ds.set_epoch(epoch)
        return [s.ref.name for s in ds.shard_order()]

    assert order(0) == order(0) and order(5) == order(5)
    assert len({tuple(order(e)) for e in range(6)}) > 1
    assert sorted(order(2)) == order(2, shuffle=False) == order(3, shuffle=False)


def test_node_of_checks_its_arguments():
    assert node_of() == (0, 1) and node_of(2, 3) == (2, 3)
    with pytest.raises(InputError):
        node_of(3, 3)
    with pytest.raises(InputError):
        node_of(rank=1)


def test_filter_selected_and_attach_scores_as_webdataset_stages(data):
    out = out_of(data, "tar")
    reference = {key_of(s): s for s in selected_samples(out, original=True)}
    kept = kept_records(out)
    assert set(kept) == set(reference)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(data["tar"]),
        wds.tarfile_to_samples(),
        partial(filter_selected, kept=kept),
    )
    got = list(pipeline)
    assert len(got) == len(reference)
    for s in got:
        ref = reference[(Path(s["__url__"]).name, s["__key__"])]
        assert s["sage"] == ref["sage"] and s["npy"] == ref["npy"]
    emitted = sorted(str(p) for p in Path(out, "shards").iterdir())
    loaded = list(wds.WebDataset(emitted, shardshuffle=False).compose(attach_scores))
    assert [(Path(s["__url__"]).name, s["__key__"], s["sage"]) for s in loaded] == [
        (k[0], k[1], reference[k]["sage"]) for k in sorted(reference)
    ]


@pytest.mark.parametrize("keep", ["shardindex.json", None])
def test_emitted_shards_without_a_manifest(data, tmp_path, keep):
    out = out_of(data, "tar")
    copy = tmp_path / "copy"
    shutil.copytree(Path(out, "shards"), copy / "shards")
    if keep:
        shutil.copy(Path(out, keep), copy / keep)
    assert without_url(selected_samples(str(copy))) == without_url(selected_samples(out))


def test_reads_any_fsspec_url(data, mem_url):
    import fsspec

    out = out_of(data, "tar")
    fs = fsspec.filesystem("memory")
    for name in ("manifest.json", "_SUCCESS", "shardindex.json"):
        fs.pipe(f"{mem_url}/out/{name}", Path(out, name).read_bytes())
    for p in Path(out, "shards").iterdir():
        fs.pipe(f"{mem_url}/out/shards/{p.name}", p.read_bytes())
    got = list(SelectedDataset(f"{mem_url}/out", decode=key_of))
    assert sorted(got) == selection(out)


def test_unfinished_run_is_refused(data, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(out_of(data, "tar"), copy)
    (copy / "_SUCCESS").unlink()
    with pytest.raises(InputError, match="_SUCCESS"):
        SelectedDataset(str(copy))


def test_preprocessed_run_needs_a_decoder(data, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(out_of(data, "tar"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["preprocess"] = "mymod:prep"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="preprocess"):
        SelectedDataset(str(copy))
    assert len(list(SelectedDataset(str(copy), decode=key_of))) == N // 2


def test_a_changed_input_shard_is_an_error_or_a_logged_skip(data, tmp_path, caplog):
    out = out_of(data, "tar")
    inputs = [str(tmp_path / Path(u).name) for u in data["tar"]]
    for src, dst in zip(data["tar"], inputs, strict=True):
        shutil.copy(src, dst)
    shard, gone = selection(out)[0]
    # Rewrite the shard of the first kept sample without that sample.
    rows = [
        (s["__key__"], {"npy": s["npy"], "cls": s["cls"]})
        for s in wds.WebDataset(str(tmp_path / shard), shardshuffle=False)
        if s["__key__"] != gone
    ]
    make_tar_shard(tmp_path / shard, rows)
    with pytest.raises(ShardError, match="changed since the run"):
        list(SelectedDataset(out, inputs=inputs, decode=key_of))
    got = list(SelectedDataset(out, inputs=inputs, decode=key_of, on_error="skip"))
    assert sorted(got) == [k for k in selection(out) if k != (shard, gone)]
    assert "changed since the run" in caplog.text


def load_script(relative: str):
    """A script (not in a package) as a module; registered so that its dataclasses work."""
    name = Path(relative).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_example():
    return load_script("examples/train_on_selection.py")


def test_training_example_trains_on_a_tiny_run(data, capsys):
    example = load_example()
    out = out_of(data, "tar")
    argv = [out, "--model", "tiny:mlp", "--epochs", "3", "--batch-size", "16", "--lr", "0.01"]
    result = example.main([*argv, "--num-workers", "2"])
    # Each of the 2 workers batches its own shards: 60 kept samples make 4 or 5 batches.
    assert result["samples_seen"] == 3 * N // 2 and 3 * 4 <= result["steps"] <= 3 * 5
    assert result["device"] == "cpu" and result["amp"] == "off" and "heldout_accuracy" not in result
    original = example.main([*argv, "--original", "--num-workers", "0", "--max-steps", "5"])
    assert original["steps"] == 5 and np.isfinite(original["last_epoch_loss"])
    assert f"steps={result['steps']} samples_seen=180" in capsys.readouterr().out


def test_training_example_reports_heldout_accuracy_on_demo_data(tmp_path):
    from sage_stream.demo import load_digits_data, write_shards

    x, y = load_digits_data()
    urls = write_shards(tmp_path / "in", x[:400], y[:400])
    out = str(tmp_path / "run")
    options = {**OPTIONS, "model": "sage_stream.demo:digits_mlp", "scorer": "random"}
    sage_stream.run(urls, out=out, **options)
    result = load_example().main([out, "--epochs", "10", "--num-workers", "0"])
    assert result["kept_samples"] == 200
    assert result["heldout_accuracy"] > 0.6  # chance is 0.1


@pytest.mark.slow
def test_quality_benchmark_writes_its_table_plot_and_results(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling modules
    bench = load_script("benchmarks/quality.py")
    begin, end = bench.quality_report.BEGIN, bench.quality_report.END
    (tmp_path / "quality.md").write_text(f"# Q\n\n{begin}\nold\n{end}\n\nguidance\n")
    argv = ["--data", "digits", "--scenarios", "label-noise", "--scorers", "loss-easy,random"]
    argv += ["--keeps", "0.5"]
    report = bench.main([*argv, "--seeds", "2", "--output-dir", str(tmp_path)])
    results = report["scenarios"]["digits/label-noise"]["results"]
    cells = [results[n]["0.5"] for n in ("loss-easy", "random", "random-subset")]
    assert all(c["n"] == [700] and len(c["accuracy"]["values"]) == 2 for c in cells)
    assert all(0.0 <= a <= 1.0 for c in cells for a in c["accuracy"]["values"])
    easy, rand = cells[0]["flipped_share"]["mean"], cells[1]["flipped_share"]["mean"]
    assert easy < rand  # keeping the lowest losses drops flipped labels
    text = (tmp_path / "quality.md").read_text()
    assert "\nold\n" not in text and text.endswith("guidance\n") and "| 0.5 | 700 |" in text
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["scenarios"]["digits/label-noise"]["keeps"] == [0.5]
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.s3
def test_s3_in_forked_dataloader_workers(data, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    out = out_of(data, "tar")
    fs.put(out, f"{s3_bucket}/out", recursive=True)
    fs.put(data["tar"], f"{s3_bucket}/in/")
    inputs = [f"{s3_bucket}/in/{Path(u).name}" for u in data["tar"]]
    for kw in ({}, {"inputs": inputs}):  # emitted shards; original shards + selection
        ds = SelectedDataset(f"{s3_bucket}/out", decode=key_of, **kw)
        got = DataLoader(ds, batch_size=None, num_workers=2)  # s3fs was used before the fork
        assert sorted(tuple(k) for k in got) == selection(out)


def test_shuffle_buffer_mixes_samples_within_shards_reproducibly(data):
    out = out_of(data, "tar")

    def keys(epoch: int, buffer: int) -> list[str]:
        ds = SelectedDataset(out, decode=key_of, shuffle_buffer=buffer, seed=1)
        ds.set_epoch(epoch)
        return [k for k, _ in ds]

    plain = keys(0, 0)
    mixed = keys(0, 16)
    assert sorted(mixed) == sorted(plain) and mixed != plain  # same samples, once each
    assert keys(0, 16) == mixed and keys(1, 16) != mixed  # reproducible, new per epoch
    with pytest.raises(InputError, match="shuffle_buffer"):
        SelectedDataset(out, shuffle_buffer=-1)


def test_equal_per_rank_gives_every_rank_the_same_count(data):
    out = out_of(data, "tar")
    total = SelectedDataset(out).num_samples
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*worker processes in total.*")
        for world in (2, 3):
            for workers in (0, 2):
                counts = []
                for rank in range(world):
                    ds = SelectedDataset(out, decode=key_of, rank=rank, world_size=world,
                                         equal_per_rank=True)  # fmt: skip
                    loader = DataLoader(ds, batch_size=None, num_workers=workers)
                    counts.append(sum(1 for _ in loader))
                assert counts == [total // world] * world, (world, workers, counts)
