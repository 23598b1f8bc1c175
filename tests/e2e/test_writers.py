"""One writer per output folder (issue 15, "Trust at scale", case 2), and what OUT may hold.

- Two runs on one OUT (the first a process of its own, the second in the test's process): the
  second stops at once with one line naming the first; a second that breaks the lease with
  --force-unlock makes the first stop before it commits. Two writers can never both finish.
- `--keep 0.4` then `--keep 0.2` on one OUT gives exactly the output of a fresh 0.2 run.
- Inputs inside OUT are refused (so --overwrite can never delete them).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from here import cli_here
from paths import HELPERS, child_env
from runs import assert_same_outputs
from tiny import blobs, train_checkpoint, write_tar_set

import sage_stream
from sage_stream.errors import InputError

OPTIONS = dict(model="tiny:mlp", ell=8, batch_size=32, device="cpu", progress=False,
               preprocess="gate:decode")  # fmt: skip


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    x, _, noisy = blobs(120)
    urls = write_tar_set(root / "in", x, noisy)
    return root, urls, train_checkpoint(root / "proxy.pt", x, noisy)


def command(urls, ckpt, out, *flags) -> list[str]:
    return ["run", *urls, "--model", "tiny:mlp", "--checkpoint", ckpt, "--out", str(out),
            "--keep", "0.5", "--ell", "8", "--batch-size", "32", "--device", "cpu",
            "--preprocess", "gate:decode", "--loader-workers", "0", "--no-progress", *flags]  # fmt: skip


def start(urls, ckpt, out, *flags, gate):
    """The first writer: a process of its own, which waits at `gate` while it holds OUT."""
    args = [sys.executable, "-m", "sage_stream", *command(urls, ckpt, out, *flags)]
    return subprocess.Popen(args, env=child_env(SAGE_TEST_GATE=str(gate)), cwd=str(HELPERS),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def second(urls, ckpt, out, *flags) -> subprocess.CompletedProcess:
    """The second writer, in this process (another pid on the same host)."""
    return cli_here(command(urls, ckpt, out, *flags), cwd=HELPERS)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the first writer never started"
        time.sleep(0.05)


def consistent(out: Path) -> None:
    """What a committed OUT promises: every listed shard holds its listed count, and the
    selection is what was emitted."""
    import json
    import tarfile

    manifest = json.loads((out / "manifest.json").read_text())
    chosen = pq.read_table(out / "selection.parquet").to_pylist()
    for entry in manifest["outputs"]:
        with tarfile.open(out / entry["url"]) as tf:
            keys = {m.name[: -len(".sage.json")] for m in tf if m.name.endswith(".sage.json")}
        shard = entry["url"].split("/", 1)[1]
        assert keys == {r["__key__"] for r in chosen if r["__shard__"] == shard}
        assert len(keys) == entry["samples"]


def test_a_second_writer_stops_at_once_naming_the_first(job, tmp_path):
    root, urls, ckpt = job
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = start(urls, ckpt, out, gate=gate)
    wait_for(Path(str(gate) + ".entered"), first)  # the first holds OUT, mid pass 1
    stopped = second(urls, ckpt, out, "--keep", "0.2")
    err = stopped.stderr
    assert stopped.returncode == 2
    lines = [ln for ln in err.splitlines() if "sage-stream: error" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "is being written by another run (host " in lines[0]
    assert f"pid {first.pid}, since" in lines[0]
    Path(str(gate) + ".open").touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (out / "_SUCCESS").exists() and not (out / "_LEASE").exists()
    consistent(out)


def test_a_broken_lease_stops_its_old_holder_before_it_commits(job, tmp_path):
    root, urls, ckpt = job
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = start(urls, ckpt, out, gate=gate)
    wait_for(Path(str(gate) + ".entered"), first)
    breaker = second(urls, ckpt, out, "--force-unlock")  # the user thinks the first is gone
    assert breaker.returncode == 0, breaker.stderr
    Path(str(gate) + ".open").touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 2, err  # both can never finish
    assert "no longer holds _LEASE" in err and "Traceback" not in err
    assert (out / "_SUCCESS").exists()
    consistent(out)


def test_keep_then_another_keep_gives_the_fresh_output(job, tmp_path):
    root, urls, ckpt = job
    sage_stream.run(urls, out=str(tmp_path / "a"), checkpoint=ckpt, keep=0.4, **OPTIONS)
    sage_stream.run(urls, out=str(tmp_path / "a"), checkpoint=ckpt, keep=0.2, **OPTIONS)
    sage_stream.run(urls, out=str(tmp_path / "b"), checkpoint=ckpt, keep=0.2, **OPTIONS)
    assert_same_outputs(tmp_path / "a", tmp_path / "b")
    consistent(tmp_path / "a")


def test_inputs_inside_out_are_refused_and_never_deleted(job, tmp_path):
    root, urls, ckpt = job
    out = tmp_path / "out"
    inside = write_tar_set(out / "data", *blobs(60)[::2])
    for overwrite in (False, True):
        with pytest.raises(InputError, match="inside the output folder"):
            sage_stream.run(inside, out=str(out), checkpoint=ckpt, keep=0.5,
                            overwrite=overwrite, **OPTIONS)  # fmt: skip
    assert all(Path(u).exists() for u in inside)
    assert not (out / "_LEASE").exists()
