"""`--dry-run` prints the plan and writes nothing (issue 26.5)."""

from __future__ import annotations

from tiny import blobs, train_checkpoint, write_tar_set

from sage_stream.cli import main

COMMON = ["--device", "cpu", "--no-progress", "--ell", "8", "--loader-workers", "0"]


def _files(root) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} if root.exists() else {}


def test_dry_run_plans_without_writing(tmp_path, capsys):
    x, _, noisy = blobs(60)
    urls = write_tar_set(tmp_path / "in", x, noisy, shards=2)
    ckpt = train_checkpoint(tmp_path / "p.pt", x, noisy)
    out = tmp_path / "out"
    run = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--out", str(out),
           "--keep", "0.5", *COMMON]  # fmt: skip
    assert main([*run, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()  # before: --dry-run was an unknown option
    assert f"{urls[0]}  size={(tmp_path / 'in' / 'part-000.tar').stat().st_size} " in text
    assert "OUT: new" in text and "pass 1 (sketch): would run" in text
    assert "pass 2 (score): would score 2 shard(s), 0 already scored" in text
    assert main(run) == 0
    before = _files(out)
    capsys.readouterr()
    assert main([*run, "--dry-run"]) == 0
    assert "finished run of this command" in capsys.readouterr().out
    assert main([*run[: -len(COMMON) - 2], "--keep", "0.2", *COMMON, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "pass 1 (sketch): done" in text and "2 already scored" in text
    assert "select: would choose (keep 0.2" in text
    assert main([*run, "--ell", "4", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "REFUSED" in text and "differs in: ell" in text
    assert main(["select", "--out", str(out), "--keep", "0.1", "--dry-run"]) == 0
    assert "over the scores of 2 shard(s)" in capsys.readouterr().out
    assert _files(out) == before  # not a file added, removed or rewritten


def test_a_finished_run_is_another_command_once_dedup_differs(tmp_path, capsys):
    x, _, noisy = blobs(60)
    urls = write_tar_set(tmp_path / "in", x, noisy, shards=2)
    ckpt = train_checkpoint(tmp_path / "p.pt", x, noisy)
    run = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--out",
           str(tmp_path / "out"), "--keep", "0.5", *COMMON]  # fmt: skip
    assert main([*run, "--dedup", "on"]) == 0
    capsys.readouterr()
    assert main([*run, "--dedup", "on", "--dry-run"]) == 0
    assert "finished run of this command" in capsys.readouterr().out
    assert main([*run, "--dry-run"]) == 0  # before: --dedup off read as the same command
    text = capsys.readouterr().out
    assert "finished run of this command" not in text and "select: would choose" in text
