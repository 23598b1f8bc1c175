"""`sage-stream inspect OUT --key KEY` (issue 26.2): a sample's scores row, whether it was kept,
and its class's cut."""

from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest
from tiny import blobs, train_checkpoint, write_tar_set

from sage_stream.cli import main

COMMON = ["--device", "cpu", "--no-progress", "--ell", "8", "--loader-workers", "0"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    x, _, noisy = blobs(120)
    urls = write_tar_set(root / "in", x, noisy, shards=2)
    ckpt = train_checkpoint(root / "p.pt", x, noisy)
    out = root / "out"
    argv = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--keep", "0.5",
            "--scorer", "sage", "--out", str(out), *COMMON]  # fmt: skip
    assert main(argv) == 0
    return out


def _explain(out, key, capsys) -> str:
    capsys.readouterr()
    assert main(["inspect", str(out), "--key", key]) == 0
    return capsys.readouterr().out


def test_kept_and_dropped_samples_against_their_class_cut(out, capsys):
    scores = pq.read_table(out / "scores").to_pylist()
    kept = set(pq.read_table(out / "selection.parquet")["__key__"].to_pylist())
    label = scores[0]["label"]
    ours = [r for r in scores if r["label"] == label]
    cut = min(r["score"] for r in ours if r["__key__"] in kept)
    for row in (next(r for r in ours if r["__key__"] in kept),
                next(r for r in ours if r["__key__"] not in kept)):  # fmt: skip
        text = _explain(out, row["__key__"], capsys)
        assert f"shard {row['__shard__']}: label {label}  status ok  score " in text
        assert ("KEPT" in text) == (row["__key__"] in kept)
        found = re.search(r"class (\S+): (\d+) kept, lowest kept ranking value (\S+)", text)
        assert found and int(found.group(2)) == sum(r["__key__"] in kept for r in ours)
        assert float(found.group(3)) == pytest.approx(cut, rel=1e-5)
        if row["__key__"] not in kept:  # --scorer sage: the agreement is the ranking value
            assert row["score"] <= cut


def test_an_unknown_key_is_one_line(out, capsys):
    assert main(["inspect", str(out), "--key", "no-such-key"]) == 2
    assert "no sample with key 'no-such-key'" in capsys.readouterr().err
