"""Regression tests from review: what must never be published under _SUCCESS."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from runs import output_files
from shardmaker import make_tar_shard, npy_bytes
from tiny import blobs, mlp, train_checkpoint, write_tar_set

import sage_stream
from sage_stream.cli import main
from sage_stream.errors import InputError, MismatchError

OPTIONS = dict(model="tiny:mlp", ell=8, device="cpu", progress=False)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    x, _, noisy = blobs(90)
    other_x, _, other_y = blobs(90, seed=1)
    return {
        "urls": write_tar_set(root / "a", x, noisy),
        "other": write_tar_set(root / "b", other_x, other_y),  # same names and keys
        "ckpt": train_checkpoint(root / "p.pt", x, noisy),
    }


def test_emit_or_select_over_other_inputs_is_refused(job, tmp_path):
    out = str(tmp_path / "o")
    sage_stream.run(job["urls"], out=out, checkpoint=job["ckpt"], keep=0.5, **OPTIONS)
    for inputs in (job["urls"][:1], job["other"]):
        with pytest.raises(MismatchError, match="not the ones"):
            sage_stream.emit(inputs, out=out, progress=False)
        with pytest.raises(MismatchError, match="not the ones"):
            sage_stream.select(inputs=inputs, out=out, keep=0.5)
    assert (tmp_path / "o" / "_SUCCESS").exists()


def test_steps_one_by_one_write_the_same_manifest_as_run(job, tmp_path):
    steps, whole = str(tmp_path / "steps"), str(tmp_path / "whole")
    common = dict(checkpoint=job["ckpt"], **OPTIONS)
    sage_stream.sketch(job["urls"], out=steps, **common)
    sage_stream.score(job["urls"], out=steps, **common)
    sage_stream.select(out=steps, keep=0.5)
    sage_stream.emit(job["urls"], out=steps, progress=False)
    sage_stream.run(job["urls"], out=whole, keep=0.5, **common)
    assert output_files(tmp_path / "steps") == output_files(tmp_path / "whole")


def test_a_refused_select_leaves_a_finished_run_complete(job, tmp_path, capsys):
    out = str(tmp_path / "o")
    sage_stream.run(job["urls"], out=out, checkpoint=job["ckpt"], keep=0.5, **OPTIONS)
    assert main(["select", "--out", out, "--keep", "0.3", "--min-score", "0.1"]) == 2
    assert main(["select", "--out", out, "--min-score", "nan"]) == 2
    assert "not both" in capsys.readouterr().err
    assert (tmp_path / "o" / "_SUCCESS").exists()


def test_a_duplicate_key_keeps_the_scores_of_its_first_sample(tmp_path):
    good = {"npy": npy_bytes(np.ones(8, np.float32)), "cls": b"1"}
    samples = [("a", good), ("b", good), ("a", good)]  # "a" again, not adjacent
    url = make_tar_shard(tmp_path / "dup.tar", samples)
    out = tmp_path / "o"
    sage_stream.run([url], out=str(out), keep=1.0, **OPTIONS)
    kept = {
        s["__key__"]: json.loads(s["sage.json"])
        for s in wds.WebDataset(str(out / "shards" / "dup.tar"), shardshuffle=False)
    }
    assert set(kept) == {"a", "b"} and kept["a"]["score"] is not None
    assert kept["a"]["score"] == kept["b"]["score"]  # the same sample, the same score


def test_an_odd_shaped_sample_does_not_spoil_its_batch(tmp_path):
    x, _, y = blobs(20)
    samples = [("odd", {"npy": npy_bytes(np.ones(12, np.float32)), "cls": b"0"})]
    samples += [
        (f"k{i:02d}", {"npy": npy_bytes(x[i]), "cls": str(y[i]).encode()}) for i in range(20)
    ]
    url = make_tar_shard(tmp_path / "s.tar", samples)
    result = sage_stream.run([url], out=str(tmp_path / "o"), keep=0.5, **OPTIONS)
    assert (result.score.scored, result.score.errored) == (20, 1)
    with pytest.raises(sage_stream.SampleError, match="cannot take this input"):
        sage_stream.run([url], out=str(tmp_path / "f"), keep=0.5, on_error="fail", **OPTIONS)


def test_centroid_scores_survive_large_gradients(job, tmp_path):
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(1000.0)  # hidden activations ~1e3: raw z would overflow float16
    out = tmp_path / "o"
    options = {**OPTIONS, "model": model, "consensus": "centroid"}
    result = sage_stream.run(job["urls"], out=str(out), keep=0.5, **options)
    assert result.score.scored > 0 and result.select.kept == round(0.5 * result.score.scored)


def test_a_missing_keep_is_refused_before_any_work(job, tmp_path):
    with pytest.raises(InputError, match="--keep"):
        sage_stream.run(job["urls"], out=str(tmp_path / "o"), checkpoint=job["ckpt"], **OPTIONS)
    assert not (tmp_path / "o").exists()
