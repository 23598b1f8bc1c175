"""Pass 2 from what pass 1 kept (passes/kept.py): the same scores, byte for byte, as pass 2
reading, decoding and running the model on the shards again; anything it cannot replay is read."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from runs import output_files
from shardmaker import make_tar_shard, npy_bytes
from tiny import DIM, blobs, mlp, write_tar_set

import sage_stream
from sage_stream.config import make_config
from sage_stream.executors.ray_worker import ShardWorker
from sage_stream.outputs.folder import OutputFolder
from sage_stream.passes import kept as kept_module
from sage_stream.passes import sketch as pass1
from sage_stream.passes.loop import build_context
from sage_stream.storage import pin_of

BASE = dict(model=mlp, device="cpu", batch_size=8, ell=4, progress=False, loader_workers=0)


@pytest.fixture(autouse=True)
def small_shards_kept(monkeypatch):
    monkeypatch.setattr(kept_module, "MIN_SAMPLES", 1)  # this file's shards hold 5 and 30 samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Three clean shards and one with an undecodable sample, one the model refuses and a
    non-finite one (Skipped items, a refused batch and an error row in one shard)."""
    root = tmp_path_factory.mktemp("kept")
    x, _, noisy = blobs(90)
    urls = write_tar_set(root, x, noisy, shards=3)
    bad = {
        "b0": {"npy": npy_bytes(x[0]), "cls": b"0"},
        "b1": {"npy": b"not an npy", "cls": b"1"},
        "b2": {"npy": npy_bytes(np.zeros(DIM + 1, np.float32)), "cls": b"2"},
        "b3": {"npy": npy_bytes(np.full(DIM, np.nan, np.float32)), "cls": b"1"},
        "b4": {"npy": npy_bytes(x[4]), "cls": b"1"},
    }
    return [*urls, make_tar_shard(root / "bad.tar", bad)]


def kept_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "_work" / "kept").glob("*"))


def passes(urls: list[str], out: Path, **opts) -> list[str]:
    """Pass 1 then pass 2; the kept files between them."""
    sage_stream.sketch(urls, out=str(out), **BASE, **opts)
    kept = kept_files(out)
    opts.pop("feature_cache", None)  # pass 1's option: pass 2 replays what there is
    sage_stream.score(urls, out=str(out), **BASE, **opts)
    return kept


def results(out: Path) -> dict[str, bytes]:
    files = output_files(out)
    return {name: data for name, data in files.items() if not name.startswith("_work")}


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"label_key": "predicted"},
        {"project_dim": 16},
        {"consensus": "centroid"},
        {"precision": "bf16"},
        {"scorer": "sage-coverage"},
    ],  # fmt: skip
)
def test_pass2_from_kept_files_is_pass2_from_the_shards(shards, tmp_path, caplog, opts):
    caplog.set_level(logging.INFO, logger="sage_stream")
    kept = passes(shards, tmp_path / "kept", **opts)
    assert kept == ["bad.tar.parquet", *(f"part-{i:03d}.tar.parquet" for i in range(3))]
    assert "pass 2: 4 of 4 shards from what pass 1 kept" in caplog.text
    assert kept_files(tmp_path / "kept") == []  # each removed once replayed
    assert passes(shards, tmp_path / "read", feature_cache=0, **opts) == []
    mine, reference = results(tmp_path / "kept"), results(tmp_path / "read")
    assert mine.keys() == reference.keys() and any(n.startswith("scores/") for n in mine)
    assert [n for n in mine if mine[n] != reference[n]] == []


def test_params_mode_keeps_nothing(shards, tmp_path):
    """--grad params has no closed form from the head's input and output."""
    assert passes(shards[:1], tmp_path / "out", grad="params") == []


def test_a_shard_of_few_samples_is_read_again(shards, tmp_path, monkeypatch):
    """Its file would cost more than reading it again saves (kept.MIN_SAMPLES). Read after
    replayed shards, its refused sample's reason names the shape the model took, as when
    every shard is read."""
    monkeypatch.setattr(kept_module, "MIN_SAMPLES", 6)
    assert passes(shards, tmp_path / "out") == [f"part-{i:03d}.tar.parquet" for i in range(3)]
    passes(shards, tmp_path / "read", feature_cache=0)
    assert results(tmp_path / "out") == results(tmp_path / "read")
    reasons = pq.read_table(tmp_path / "out" / "scores" / "part-bad.tar.parquet")["reason"]
    assert "inputs of shape (8,) fit" in reasons[2].as_py()


def test_a_refused_batch_before_any_the_model_took_replays_as_read(shards, tmp_path):
    """One `run`: pass 1 refuses the bad shard's batch before any batch fitted (no hint), a
    pass 2 reading it gives the hint (pass 1 fitted one since): replaying gives it too."""
    first = [shards[-1], *shards[:-1]]
    for out, cache in (("kept", 2**30), ("read", 0)):
        sage_stream.run(first, out=str(tmp_path / out), keep=0.5, feature_cache=cache, **BASE)
    assert results(tmp_path / "kept") == results(tmp_path / "read")


def test_a_shard_changed_since_it_was_listed_is_not_replayed(shards, tmp_path):
    out = tmp_path / "out"
    sage_stream.sketch(shards[:1], out=str(out), **BASE)
    ctx = build_context(make_config(inputs=shards[:1], out=str(out), **BASE))
    ref = dataclasses.replace(ctx.refs[0], pin=pin_of(shards[0]))  # as the API pinned it
    assert kept_module.kept_batches(ctx, ref) is not None
    os.utime(shards[0], (1, 1))  # another mtime: what a rewrite would change
    assert kept_module.kept_batches(ctx, ref) is None  # reading it raises the pin's error


def test_a_kept_file_that_cannot_be_written_stops_keeping_not_the_run(shards, tmp_path, caplog,
                                                                    monkeypatch):  # fmt: skip
    real = OutputFolder.writer

    def full_disk(self, url):
        if "/kept/" in url:
            raise OSError(28, "No space left on device")
        return real(self, url)

    monkeypatch.setattr(OutputFolder, "writer", full_disk)
    assert passes(shards, tmp_path / "out") == []
    assert caplog.text.count("cannot keep features for pass 2") == 1
    passes(shards, tmp_path / "read", feature_cache=0)
    assert results(tmp_path / "out") == results(tmp_path / "read")


def test_budget_keeps_whole_shards_until_it_is_spent(shards, tmp_path):
    """A budget for about one shard keeps the first one (30 samples of (16 + 3) floats) and
    stops; the rest are read in pass 2, with the same scores."""
    kept = passes(shards, tmp_path / "some", feature_cache=4000)
    assert kept == ["part-000.tar.parquet"]
    passes(shards, tmp_path / "none", feature_cache=0)
    assert results(tmp_path / "some") == results(tmp_path / "none")


@pytest.mark.parametrize("damage", ["other-run", "truncated"])
def test_a_kept_file_it_cannot_replay_is_read_again(shards, tmp_path, caplog, damage):
    out = tmp_path / "out"
    sage_stream.sketch(shards, out=str(out), **BASE)
    victim = out / "_work" / "kept" / "part-001.tar.parquet"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:100])
    else:  # the file of a run with another batch size: same keys, other bits
        other = tmp_path / "other"
        sage_stream.sketch(shards, out=str(other), **{**BASE, "batch_size": 5})
        victim.write_bytes((other / "_work" / "kept" / victim.name).read_bytes())
    caplog.set_level(logging.INFO, logger="sage_stream")
    sage_stream.score(shards, out=str(out), **BASE)
    passes(shards, tmp_path / "read", feature_cache=0)
    assert results(out) == results(tmp_path / "read")
    if damage == "other-run":
        assert "part-001.tar.parquet was kept by another run" in caplog.text


@pytest.mark.parametrize(("units", "read"), [(2, ["part-002"]), (4, ["part-001", "part-002"])])
def test_units_keep_only_the_shards_they_stream_whole(shards, tmp_path, monkeypatch, units, read):
    """Ray's units (here in process): a unit that starts after a shard's first batch or stops
    inside one does not keep it; pass 2 reads those, and the scores are the local run's.
    With groups of ~7 samples, parts 1 and 2 have no group start in their first batch (of 8):
    the unit that starts there bypasses it, the one before stops in its second batch."""
    monkeypatch.setattr(pass1, "group_rows", lambda ell: 7)
    local = tmp_path / "local"
    passes(shards, local)
    cfg = make_config(inputs=shards, out=str(tmp_path / "units"), **BASE)
    worker = ShardWorker(cfg)
    refs = build_context(cfg).refs
    summaries = [worker.sketch_unit(refs, i, units) for i in range(units)]
    worker.finish(summaries, seconds=0.0)
    kept = kept_files(tmp_path / "units")
    assert kept == sorted(
        {f"{Path(u).name}.parquet" for u in shards} - {f"{r}.tar.parquet" for r in read}
    )
    sketch = worker.ctx.out.sketch_store().read()
    for ref in refs:
        worker.score(ref, sketch)
    unit_scores = {n: d for n, d in results(tmp_path / "units").items() if n.startswith("scores/")}
    local_scores = {n: d for n, d in results(local).items() if n.startswith("scores/")}
    assert unit_scores == local_scores
