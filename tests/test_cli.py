"""The command line: every step on its own, inspect, one-line errors, config files."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from tiny import blobs, train_checkpoint, write_tar_set

from sage_stream.cli import main

N = 90


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    x, _, noisy = blobs(N)
    return write_tar_set(root / "in", x, noisy), train_checkpoint(root / "p.pt", x, noisy)


def common(ckpt: str) -> list[str]:
    return ["--model", "tiny:mlp", "--checkpoint", ckpt, "--ell", "8", "--device", "cpu",
            "--no-progress"]  # fmt: skip


def test_steps_one_by_one_equal_run(shards, tmp_path, capsys):
    urls, ckpt = shards
    steps, whole = str(tmp_path / "steps"), str(tmp_path / "whole")
    assert main(["sketch", *urls, "--out", steps, *common(ckpt)]) == 0
    assert "error bound" in capsys.readouterr().out
    assert main(["score", *urls, "--out", steps, *common(ckpt)]) == 0
    assert main(["select", "--out", steps, "--keep", "0.3"]) == 0
    assert "kept 27 of 90" in capsys.readouterr().out
    assert main(["emit", *urls, "--out", steps, "--no-progress"]) == 0
    assert main(["run", *urls, "--out", whole, "--keep", "0.3", *common(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "seen 90  scored 90  errored 0  kept 27  dropped 63" in out
    a = pq.read_table(f"{steps}/selection.parquet")
    assert a.equals(pq.read_table(f"{whole}/selection.parquet"))
    manifest = json.loads((tmp_path / "steps" / "manifest.json").read_text())
    assert manifest["totals"]["kept"] == 27


def test_inspect_summarises_output_sketch_and_scores(shards, tmp_path, capsys):
    urls, ckpt = shards
    out = str(tmp_path / "o")
    main(["run", *urls, "--out", out, "--keep", "0.5", *common(ckpt)])
    capsys.readouterr()
    assert main(["inspect", out]) == 0
    assert "complete (_SUCCESS)" in capsys.readouterr().out
    assert main(["inspect", f"{out}/sketch.zarr"]) == 0
    text = capsys.readouterr().out
    assert "ℓ=8" in text and "C=3" in text
    assert main(["inspect", f"{out}/scores"]) == 0
    assert "90 samples" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            [
                "run",
                "/nonexistent/shard-{000..003}.tar",
                "--out",
                "x",
                "--keep",
                "0.1",
                "--model",
                "tiny:mlp",
            ],
            "/nonexistent",
        ),  # fmt: skip
        (["select", "--out", "/nonexistent-out", "--keep", "0.1"], "score"),
        (["run", "IN", "--out", "x", "--model", "tiny:mlp", "--keep", "2"], "--keep"),
        (["run", "IN", "--out", "x", "--model", "nomodule:fn", "--keep", "0.5"], "nomodule"),
        (
            [
                "run",
                "IN",
                "--out",
                "x",
                "--model",
                "tiny:mlp",
                "--keep",
                "0.5",
                "--storage-option",
                "novalue",
            ],
            "KEY=VALUE",
        ),  # fmt: skip
    ],
)
def test_expected_errors_print_one_line(shards, argv, needle, capsys):
    argv = [shards[0][0] if a == "IN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sage-stream: error:") and needle in err[0]


def test_on_error_fail_names_shard_and_key(tmp_path, capsys):
    import numpy as np
    from shardmaker import make_tar_shard, npy_bytes

    good = {"npy": npy_bytes(np.zeros(8, np.float32)), "cls": b"1"}
    url = make_tar_shard(tmp_path / "bad.tar", {"a": good, "b": {"npy": b"garbage", "cls": b"0"}})
    argv = ["run", url, "--out", str(tmp_path / "o"), "--keep", "0.5", "--model", "tiny:mlp",
            "--on-error", "fail", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bad.tar" in err and "'b'" in err and "npy" in err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for command in ("run", "sketch", "score", "select", "emit", "inspect", "demo"):
        assert command in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--keep" in text and "--on-error" in text and "--storage-option" in text


def test_config_file_with_flags_winning(shards, tmp_path, capsys):
    urls, ckpt = shards
    config = tmp_path / "job.toml"
    config.write_text(
        f'inputs = {json.dumps(urls)}\nmodel = "tiny:mlp"\ncheckpoint = "{ckpt}"\n'
        f'out = "{tmp_path / "o"}"\nkeep = 0.9\nell = 8\ndevice = "cpu"\nbatch-size = 16\n'
    )
    assert main(["run", "--config", str(config), "--keep", "0.2", "--no-progress"]) == 0
    assert "kept 18" in capsys.readouterr().out
    config.write_text("nonsense-key = 1\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "nonsense_key" in capsys.readouterr().err


def test_options_are_never_abbreviated(tmp_path, capsys):
    # `emit` has no --checkpoint; argparse's prefix matching used to take it as --checkpoint-every
    with pytest.raises(SystemExit) as done:
        main(["emit", str(tmp_path), "--out", str(tmp_path / "o"), "--checkpoint", "net.pt"])
    assert done.value.code == 2
    assert "unrecognized arguments: --checkpoint net.pt" in capsys.readouterr().err
