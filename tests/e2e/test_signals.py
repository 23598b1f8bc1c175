"""SIGTERM, as `docker stop`, Kubernetes, systemd and Slurm send it (issue 25, defect 3).

A run stopped by SIGTERM in any step (sketch, score, select, emit) exits 143 with one line,
leaves no OUT/_LEASE and no _SUCCESS, and the same command run from another host (a new pod:
the dead run's lease could not be taken over from there) finishes with the bytes of an
uninterrupted run, without --force-unlock.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from paths import HELPERS, child_env
from runs import output_files
from tiny import blobs, train_checkpoint, write_tar_set

N = 90  # 3 shards of 30: pass 1 decodes samples 1-90, pass 2 samples 91-180


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    x, _, noisy = blobs(N)
    urls = write_tar_set(root / "in", x, noisy)
    return root, urls, train_checkpoint(root / "proxy.pt", x, noisy)


def cli(urls, ckpt, out, **env: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "killpoints", "run", *urls, "--model", "tiny:mlp",
            "--checkpoint", ckpt, "--out", str(out), "--keep", "0.5", "--ell", "8",
            "--batch-size", "16", "--device", "cpu", "--loader-workers", "0",
            "--preprocess", "killer:decode", "--checkpoint-every", "0", "--no-progress"]  # fmt: skip
    return subprocess.run(args, env=child_env(**env), capture_output=True, text=True,
                          cwd=str(HELPERS))  # fmt: skip


@pytest.fixture(scope="module")
def reference(job):
    root, urls, ckpt = job
    done = cli(urls, ckpt, root / "reference")
    assert done.returncode == 0, done.stderr
    return output_files(root / "reference")


STEPS = {
    "sketch": {"SAGE_TEST_KILL_AT": "45"},
    "score": {"SAGE_TEST_KILL_AT": "135"},
    "select": {"SAGE_TEST_KILL_POINT": "select"},
    "emit": {"SAGE_TEST_KILL_POINT": "emit"},
}


@pytest.mark.parametrize("step", list(STEPS))
def test_sigterm_in_each_step_resumes_from_another_host(job, reference, tmp_path, step):
    root, urls, ckpt = job
    out = tmp_path / "out"
    env = {"SAGE_TEST_KILL_SIGNAL": "TERM", "SAGE_TEST_KILL_COUNTER": str(tmp_path / "n"),
           **STEPS[step]}  # fmt: skip
    if "SAGE_TEST_KILL_POINT" in env:
        env["SAGE_TEST_KILL_AT"] = "0"  # the decoder never signals
    stopped = cli(urls, ckpt, out, **env)
    assert stopped.returncode == 143, stopped.stderr
    assert "terminated by SIGTERM" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not (out / "_LEASE").exists() and not (out / "_SUCCESS").exists()
    resumed = cli(urls, ckpt, out, SAGE_TEST_HOSTNAME="another-host")
    assert resumed.returncode == 0, resumed.stderr
    assert "lease" not in resumed.stderr  # nothing to take over or break
    assert output_files(out) == reference


def test_the_handler_is_the_commands_own():
    # in-process callers (tests, notebooks) get their own SIGTERM handler back afterwards
    import signal

    from sage_stream.cli import Terminated, sigterm_stops_cleanly

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_stops_cleanly():
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
