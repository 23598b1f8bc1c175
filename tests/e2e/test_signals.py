"""SIGTERM, as `docker stop`, Kubernetes, systemd and Slurm send it (issue 25, defect 3).

A run stopped by SIGTERM in any step (sketch, score, select, emit) exits 143 with one line,
leaves no OUT/_LEASE and no _SUCCESS, and the same command run from another host (a new pod:
the dead run's lease could not be taken over from there) finishes with the bytes of an
uninterrupted run, without --force-unlock. The runs that are stopped are processes of their
own; the reference run and the resumes run in this process (`cli_here`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from here import cli_here
from paths import HELPERS, child_env
from runs import assert_same_outputs, output_files
from tiny import blobs, train_checkpoint, write_tar_set

N = 192  # 3 shards of 64 (kept.MIN_SAMPLES, so pass 1 keeps them): pass 1 decodes 1-192


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    x, _, noisy = blobs(N)
    urls = write_tar_set(root / "in", x, noisy)
    return root, urls, train_checkpoint(root / "proxy.pt", x, noisy)


def cli(urls, ckpt, out, **env: str) -> subprocess.CompletedProcess:
    """`sage-stream run`, armed by `env` (killpoints, killer:decode) in a process of its own;
    unarmed, in this process (on the host SAGE_TEST_HOSTNAME names, if it does)."""
    args = ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--out", str(out),
            "--keep", "0.5", "--ell", "8", "--batch-size", "16", "--device", "cpu",
            "--loader-workers", "0", "--preprocess", "killer:decode", "--checkpoint-every", "0",
            "--no-progress"]  # fmt: skip
    if set(env) <= {"SAGE_TEST_HOSTNAME"}:
        return cli_here(args, cwd=HELPERS, hostname=env.get("SAGE_TEST_HOSTNAME"))
    return subprocess.run([sys.executable, "-m", "killpoints", *args], env=child_env(**env),
                          capture_output=True, text=True, cwd=str(HELPERS))  # fmt: skip


@pytest.fixture(scope="module")
def reference(job):
    root, urls, ckpt = job
    done = cli(urls, ckpt, root / "reference")
    assert done.returncode == 0, done.stderr
    return output_files(root / "reference")


STEPS = {
    "sketch": {"SAGE_TEST_KILL_AT": "45"},
    "score": {"SAGE_TEST_KILL_POINT": "replay"},  # pass 2 from what pass 1 kept
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


@pytest.mark.slow
def test_sigterm_to_a_ray_driver_stops_cleanly_and_resumes(job, ray_cluster, tmp_path):
    """`ray.init` installs its own SIGTERM handler in the driver, which aborted the process with
    OUT still locked; the executor puts the CLI's back. Stopped while both workers sketch, the
    driver exits 143 and leaves OUT unlocked; the same command then finishes with the bytes of
    an uninterrupted local run (one torch thread in every process; the local run in this one).
    Both drivers join the session's cluster as `ray job submit` has them join one: RAY_ADDRESS,
    and the job's runtime_env (its workers' environment) in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    root, urls, ckpt = job
    args = [sys.executable, "-m", "sage_stream.cli", "run", *urls, "--model", "tiny:mlp",
            "--checkpoint", ckpt, "--keep", "0.5", "--ell", "8", "--batch-size", "16",
            "--device", "cpu", "--loader-workers", "0", "--preprocess", "pausing:decode",
            "--checkpoint-every", "0", "--no-progress"]  # fmt: skip
    env = child_env(OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    threads = torch.get_num_threads()  # the local run in this process, on one thread too
    torch.set_num_threads(1)
    try:
        local = cli_here([*args[3:], "--out", str(tmp_path / "local")], cwd=HELPERS)
    finally:
        torch.set_num_threads(threads)
    assert local.returncode == 0, local.stderr

    out, counter = tmp_path / "out", tmp_path / "calls"
    on_ray = [*args, "--out", str(out), "--executor", "ray", "--workers", "2"]
    paused = {"SAGE_TEST_PAUSE_COUNTER": str(counter), "SAGE_TEST_PAUSE_AT": "40"}
    driver = subprocess.Popen(on_ray, env=ray_job_env(env, ray_cluster, paused),
                              cwd=str(HELPERS), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    deadline = time.monotonic() + 180  # Ray's start-up on a loaded machine
    while not Path(f"{counter}.paused").exists() and driver.poll() is None:
        assert time.monotonic() < deadline, "the workers never reached decode call 40"
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 143, stderr
    assert "terminated by SIGTERM" in stderr and "Traceback" not in stderr
    assert not (out / "_LEASE").exists() and not (out / "_SUCCESS").exists()

    resumed = subprocess.run(on_ray, env=ray_job_env(env, ray_cluster, {}), capture_output=True,
                             text=True, cwd=str(HELPERS))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert_same_outputs(out, tmp_path / "local")


def ray_job_env(env: dict[str, str], address: str, extra: dict[str, str]) -> dict[str, str]:
    """`env` for a driver that joins the cluster at `address`, whose workers get the driver's
    PYTHONPATH and thread count and `extra`."""
    workers = {"PYTHONPATH": env["PYTHONPATH"], "OMP_NUM_THREADS": "1", **extra}
    job = json.dumps({"runtime_env": {"env_vars": workers}})
    return {**env, **extra, "RAY_ADDRESS": address, "RAY_JOB_CONFIG_JSON_ENV_VAR": job}
