"""Reruns do what the user means (issue 26.3): the same command resumes or says that nothing
was redone; a run that stopped before any pass finished may start again with a fixed
configuration; `inspect` says where and why a run stopped; the last error of a run that
scored nothing names the real cause."""

from __future__ import annotations

import json
import logging

import pytest
from shardmaker import tar_bytes, write_bytes
from tiny import blobs, key, npy_bytes, train_checkpoint, write_tar_set

from sage_stream.cli import main

COMMON = ["--device", "cpu", "--no-progress", "--ell", "8", "--loader-workers", "0",
          "--batch-size", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reruns")
    x, _, noisy = blobs(300)
    return write_tar_set(root / "in", x, noisy, shards=2), train_checkpoint(root / "p.pt", x, noisy)


def _mtimes(out) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_no_checkpoint_the_same_command_twice_resumes_and_redoes_nothing(data, tmp_path, caplog):
    urls, _ = data
    out = tmp_path / "fresh"
    argv = ["run", *urls, "--model", "tiny:fresh_mlp", "--keep", "0.5", "--out", str(out),
            *COMMON]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((out / "manifest.json").read_text())
    before = _mtimes(out)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sage_stream"):
        assert main(argv) == 0  # refused before: "differs in: model" (random init)
    assert "nothing was redone" in caplog.text
    assert _mtimes(out) == before  # not a byte rewritten
    assert json.loads((out / "manifest.json").read_text()) == first
    other = tmp_path / "seed1"
    assert main([*argv[: -len(COMMON) - 2], "--out", str(other), "--seed", "1", *COMMON]) == 0
    assert (
        json.loads((other / "manifest.json").read_text())["identity"]["model"]
        != (first["identity"]["model"])
    )  # the seed draws the weights: another seed, another model


def test_a_finished_run_with_another_keep_is_selected_and_emitted_again(data, tmp_path, caplog):
    urls, ckpt = data
    out = tmp_path / "o"
    base = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--out", str(out), *COMMON]
    assert main([*base, "--keep", "0.5"]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sage_stream"):
        assert main([*base, "--keep", "0.2"]) == 0
    assert "nothing was redone" not in caplog.text
    assert json.loads((out / "manifest.json").read_text())["totals"]["kept"] == 60


def test_stopped_early_inspect_says_why_and_the_fixed_rerun_runs(data, tmp_path, capsys, caplog):
    urls, ckpt = data
    out = tmp_path / "wrong-key"
    base = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--keep", "0.5",
            "--out", str(out), *COMMON]  # fmt: skip
    assert main([*base, "--input-key", "image"]) == 2
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0  # before: "not a sage-stream output"
    text = capsys.readouterr().out
    assert "INCOMPLETE" in text and "STOPPED in sketch: InputError" in text
    assert "missing input field 'image'" in text and "no pass finished" in text
    caplog.clear()
    assert main(base) == 0  # before: refused, "differs in: input_key"
    assert "no pass finished" in caplog.text and "differs in: input_key" in caplog.text
    assert (out / "_SUCCESS").exists()


def test_a_changed_configuration_after_a_finished_pass_is_still_refused(data, tmp_path, capsys):
    urls, ckpt = data
    out = tmp_path / "sketched"
    model = ["--model", "tiny:mlp", "--checkpoint", ckpt, "--out", str(out), *COMMON]
    assert main(["sketch", *urls, *model]) == 0
    assert main(["sketch", *urls, *model, "--ell", "4"]) == 2
    assert "differs in: ell" in capsys.readouterr().err
    assert main(["inspect", str(out)]) == 0
    assert "finished: sketch.zarr" in capsys.readouterr().out


def test_inspect_after_select_shows_the_new_selection(data, tmp_path, capsys):
    urls, ckpt = data
    out = tmp_path / "reselected"
    argv = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--keep", "0.5",
            "--out", str(out), *COMMON]  # fmt: skip
    assert main(argv) == 0
    assert main(["select", "--out", str(out), "--keep", "0.2", "--scorer", "sage"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert '"scorer": "sage"' in text and '"keep": 0.2' in text  # before: the old selection
    assert "kept 60  dropped 240" in text and "run `sage-stream emit`" in text
    assert "part-000.tar: seen 150 kept 30 errored 0 (shards/ holds 71)" in text


def test_nothing_scored_names_the_broken_shard(tmp_path, capsys):
    x, _, noisy = blobs(4)
    samples = {key(i): {"npy": npy_bytes(x[i]), "cls": str(int(noisy[i])).encode()}
               for i in range(4)}  # fmt: skip
    whole = tar_bytes(samples)
    url = write_bytes(tmp_path / "broken.tar", whole[:700])  # cut inside the first member
    argv = ["run", url, "--model", "tiny:mlp", "--keep", "0.5", "--out", str(tmp_path / "o"),
            *COMMON]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no sample could be scored" in err
    assert "broken.tar" in err and "no reason recorded" not in err
