"""Checks that stop or warn before a run wastes hours (sage_stream.checks, and the
selection's warnings of sage_stream.select.warn seen from the command line)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from shardmaker import make_tar_shard, npy_bytes
from tiny import blobs, train_checkpoint, write_tar_set

from sage_stream.cli import main
from sage_stream.errors import InputError
from sage_stream.passes.checks import FailFast, error_reasons

COMMON = ["--device", "cpu", "--no-progress", "--ell", "8", "--loader-workers", "0"]


def test_fail_fast_stops_at_the_check_point_with_the_most_common_reason():
    check = FailFast(samples=10, share=0.9)
    check.record(0, ["bad a"] * 3)
    with pytest.raises(
        InputError, match=r"12 of the first 12 samples failed, most often \(9×: bad b"
    ):
        check.record(0, ["bad b"] * 9)
    ok = FailFast(samples=10, share=0.95)
    ok.record(1, ["x"] * 9)  # 90% failed: below the share, the run goes on
    ok.record(0, ["x"] * 100)  # checked once only
    assert ok.checked


def test_error_reasons_add_up_over_parts():
    table = pa.table({"reason": ["a", None, "b", "a"]})
    assert error_reasons([table, table]).most_common(1) == [("a", 4)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    x, _, noisy = blobs(300)
    return write_tar_set(root / "in", x, noisy, shards=2), train_checkpoint(root / "p.pt", x, noisy)


def test_a_wrong_input_key_stops_after_the_first_samples(data, tmp_path, capsys):
    urls, ckpt = data
    out = tmp_path / "o"
    argv = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--input-key", "image",
            "--keep", "0.5", "--out", str(out), *COMMON]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "of the first 256 samples failed" in err and "missing input field 'image'" in err
    assert not (out / "scores").exists()  # stopped in pass 1, long before the end


def test_no_checkpoint_and_flat_scores_warn_in_log_selection_manifest_and_report(
    data, tmp_path, caplog
):
    urls, _ = data
    out = tmp_path / "flat"
    argv = ["run", *urls, "--model", "zoo:collapsed", "--keep", "0.5", "--out", str(out),
            *COMMON]  # fmt: skip
    assert main(argv) == 0
    assert "no --checkpoint" in caplog.text and "almost no spread" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["warnings"]) == 2
    assert manifest["selection"]["warnings"] == manifest["warnings"]
    pytest.importorskip("matplotlib")
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "index.html").read_text()
    assert page.count("<b>Warning:</b>") == 2


def test_a_sound_run_records_no_warning(data, tmp_path):
    urls, ckpt = data
    out = tmp_path / "sound"
    argv = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--keep", "0.5",
            "--out", str(out), *COMMON]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "warnings" not in manifest and "warnings" not in manifest["selection"]


def test_out_must_be_empty_or_a_sage_stream_output(data, tmp_path, capsys):
    urls, ckpt = data
    base = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--keep", "0.5", *COMMON]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main([*base, "--out", str(foreign)]) == 2
    assert "not empty and not a sage-stream output (it holds notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # untouched
    folder = tmp_path / "inputs"
    make_tar_shard(folder / "a.tar", {"k0": {"npy": npy_bytes(blobs(1)[0][0]), "cls": b"0"}})
    assert main(["run", str(folder), *base[len(urls) + 1 :], "--out", str(folder)]) == 2
    assert "input" in capsys.readouterr().err


def test_inspect_and_report_work_on_partial_runs_and_every_file(data, tmp_path, capsys):
    urls, ckpt = data
    out = tmp_path / "partial"
    model = ["--model", "tiny:mlp", "--checkpoint", ckpt, *COMMON]
    assert main(["sketch", *urls, "--out", str(out), *model]) == 0
    assert main(["score", *urls, "--out", str(out), *model]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "INCOMPLETE" in text and "300 samples" in text
    part = sorted((out / "scores").glob("part-*.parquet"))[0]
    assert main(["inspect", str(part)]) == 0
    assert "150 samples" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert main(["report", str(out)]) == 0
    assert "did not finish" in (out / "report" / "index.html").read_text()
    assert main(["select", "--out", str(out), "--keep", "0.5"]) == 0
    assert main(["inspect", str(out / "selection.parquet")]) == 0
    assert "150 rows" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
