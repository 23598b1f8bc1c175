"""SIGKILL during the commit of a run (issue 15, "Trust at scale"): in the selection write, in
the manifest write, between the manifest and the index, and after _SUCCESS. Each time the
killed run leaves no _SUCCESS over partial output (or a complete output), and the same
command run again finishes with the bytes of an uninterrupted run; the dead run's lease is
taken over (same host, its process gone). The killed runs are processes of their own; the
reference run and the resumes run in this process (`cli_here`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from here import cli_here
from paths import HELPERS, child_env
from runs import output_files
from tiny import blobs, train_checkpoint, write_tar_set


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    x, _, noisy = blobs(90)
    urls = write_tar_set(root / "in", x, noisy)
    return root, urls, train_checkpoint(root / "proxy.pt", x, noisy)


def cli(urls, ckpt, out, point=None):
    """`sage-stream run`: killed at `point` in a process of its own, else in this process."""
    args = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--out", str(out),
            "--keep", "0.5", "--ell", "8", "--batch-size", "32", "--device", "cpu",
            "--loader-workers", "0", "--no-progress"]  # fmt: skip
    if point is None:
        return cli_here(args, cwd=HELPERS)
    env = child_env(SAGE_TEST_KILL_POINT=point)
    return subprocess.run([sys.executable, "-m", "killpoints", *args], env=env,
                          capture_output=True, text=True, cwd=str(HELPERS))  # fmt: skip


@pytest.fixture(scope="module")
def reference(job):
    root, urls, ckpt = job
    done = cli(urls, ckpt, root / "reference")
    assert done.returncode == 0, done.stderr
    return output_files(root / "reference")


@pytest.mark.parametrize("point", ["select", "manifest", "index", "success"])
def test_killed_in_the_commit_resumes_to_identical_output(job, reference, tmp_path, point):
    root, urls, ckpt = job
    out = tmp_path / "out"
    killed = cli(urls, ckpt, out, point)
    assert killed.returncode == -9, killed.stderr
    assert (out / "_LEASE").exists()  # a dead run's lease
    assert (out / "_SUCCESS").exists() == (point == "success")
    if point in ("select", "manifest"):  # the half-written file is in the work area only
        assert list((out / "_work" / "tmp").iterdir())
        assert not (out / ("selection.parquet" if point == "select" else "manifest.json")).exists()
    if point == "index":
        assert (out / "manifest.json").exists() and not (out / "shardindex.json").exists()
    resumed = cli(urls, ckpt, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "taking over the lease" in resumed.stderr
    assert output_files(out) == reference
