"""Resume: a run killed at any point and started again with the same command gives the same
bytes as a run never interrupted; finished work is not redone. The runs that are killed are
processes of their own; the reference run and the resumes run in this process (`cli_here`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from here import cli_here
from paths import HELPERS, child_env
from runs import output_files
from tiny import blobs, train_checkpoint, write_tar_set

import sage_stream
from sage_stream.passes import emit as emit_module

N = 192  # 3 shards of 64 (kept.MIN_SAMPLES): decode calls 1-192 are pass 1, 193-384 pass 2


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    x, _, noisy = blobs(N)
    urls = write_tar_set(root / "in", x, noisy)
    ckpt = train_checkpoint(root / "proxy.pt", x, noisy)
    return root, urls, ckpt


def cli(urls, ckpt, out, env=None, *extra):
    """`sage-stream run`, with `extra` flags; under killpoints when env names a point. A run
    that `env` may kill is a process of its own; one that cannot die runs in this process."""
    env = env or {}
    args = ["run", *urls, *extra, "--model", "tiny:mlp", "--checkpoint", ckpt, "--out", str(out),
            "--keep", "0.5", "--ell", "16", "--batch-size", "16", "--device", "cpu",
            "--preprocess", "killer:decode", "--checkpoint-every", "0", "--no-progress"]  # fmt: skip
    if "SAGE_TEST_KILL_POINT" not in env and env.get("SAGE_TEST_KILL_AT", "0") == "0":
        return cli_here(args, cwd=HELPERS, env=env)  # killer:decode never kills at call 0
    module = "killpoints" if "SAGE_TEST_KILL_POINT" in env else "sage_stream"
    return subprocess.run([sys.executable, "-m", module, *args], env=child_env(**env),
                          capture_output=True, text=True, cwd=str(HELPERS))  # fmt: skip


@pytest.fixture(scope="module")
def reference(job):
    root, urls, ckpt = job
    done = cli(urls, ckpt, root / "reference")
    assert done.returncode == 0, done.stderr
    return output_files(root / "reference")


READ_AGAIN = ("--feature-cache", "0")  # pass 2 reads and decodes the shards again


@pytest.mark.parametrize(
    ("kill_at", "extra"),  # pass 1 shards 2 and 3; pass 2 reading shards 2 and 3
    [(75, ()), (130, ()), (200, READ_AGAIN), (300, READ_AGAIN)],
)
def test_killed_run_resumes_to_identical_output(job, reference, kill_at, extra, tmp_path):
    root, urls, ckpt = job
    out = tmp_path / "out"
    env = {"SAGE_TEST_KILL_COUNTER": str(tmp_path / "count"), "SAGE_TEST_KILL_AT": str(kill_at)}
    killed = cli(urls, ckpt, out, env, *extra)
    assert killed.returncode == -9, killed.stderr
    assert not (out / "_SUCCESS").exists()
    resumed = cli(urls, ckpt, out, None, *extra)
    assert resumed.returncode == 0, resumed.stderr
    assert output_files(out) == reference


def test_resume_redoes_only_unfinished_shards(job, tmp_path):
    root, urls, ckpt = job
    out = tmp_path / "out"
    env = {"SAGE_TEST_KILL_COUNTER": str(tmp_path / "count"), "SAGE_TEST_KILL_AT": "321"}
    assert (
        cli(urls, ckpt, out, env, *READ_AGAIN).returncode == -9
    )  # killed on the first sample of pass 2, shard 3
    (tmp_path / "count").write_text("0")
    env["SAGE_TEST_KILL_AT"] = "65"  # a resume that decodes more than one shard dies
    assert cli(urls, ckpt, out, env, *READ_AGAIN).returncode == 0  # pass 1, pass 2 shards 1-2 done
    assert (tmp_path / "count").read_text() == "64"


def test_killed_while_replaying_resumes_without_reading_a_shard(job, reference, tmp_path):
    """Killed as pass 2 starts on the second shard pass 1 kept: the resume replays shards 2
    and 3 from their kept files (never decoding a sample) and ends with the same bytes."""
    root, urls, ckpt = job
    out, count = tmp_path / "out", tmp_path / "count"
    env = {"SAGE_TEST_KILL_COUNTER": str(count), "SAGE_TEST_KILL_AT": "0",
           "SAGE_TEST_KILL_POINT": "replay"}  # fmt: skip
    killed = cli(urls, ckpt, out, env)
    assert killed.returncode == -9, killed.stderr
    assert count.read_text() == str(N)  # pass 1 decoded every sample, pass 2 none
    assert sorted(p.name for p in (out / "_work" / "kept").iterdir()) == [
        "part-001.tar.parquet", "part-002.tar.parquet"]  # fmt: skip
    count.write_text("0")
    resumed = cli(urls, ckpt, out, {k: v for k, v in env.items() if k != "SAGE_TEST_KILL_POINT"})
    assert resumed.returncode == 0, resumed.stderr
    assert count.read_text() == "0"
    assert output_files(out) == reference


def test_emit_interrupted_between_shards_resumes(job, reference, tmp_path, monkeypatch):
    root, urls, ckpt = job
    out = tmp_path / "out"
    options = dict(model="tiny:mlp", checkpoint=ckpt, keep=0.5, ell=16, batch_size=16,
                   device="cpu", preprocess="killer:decode", checkpoint_every=0, progress=False)  # fmt: skip
    real, calls = emit_module.emit_shard, []

    def dying_emit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for a kill between two shards
        return real(*args, **kwargs)

    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.chdir(HELPERS)
    monkeypatch.setattr(emit_module, "emit_shard", dying_emit)
    with pytest.raises(KeyboardInterrupt):
        sage_stream.run(urls, out=str(out), **options)
    (out / "_work" / "tmp").mkdir(exist_ok=True)
    (out / "_work" / "tmp" / "0123456789ab-part-001.tar").write_bytes(b"half a shard")
    monkeypatch.setattr(emit_module, "emit_shard", real)
    sage_stream.run(urls, out=str(out), **options)
    assert output_files(out) == reference
