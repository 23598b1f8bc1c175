"""User code that fails at set-up (issue 25, defect 6): a model factory that raises, a
preprocess module that raises as it is imported. One line naming the factory or module and
the exception, exit 2; the user's own traceback with -v."""

from __future__ import annotations

import subprocess

import pytest
from here import cli_here
from tiny import blobs, write_tar_set

USER_CODE = """
import torch

def broken():
    raise RuntimeError("cannot reach the weights server\\nsecond line")

def fine():
    return torch.nn.Linear(8, 3)
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("setup")
    (root / "usermodels.py").write_text(USER_CODE)
    (root / "userprep.py").write_text("raise ValueError('no such vocabulary: v2')\n")
    x, _, noisy = blobs(30)
    return root, write_tar_set(root / "in", x, noisy, shards=1)


def cli(root, urls, *extra: str) -> subprocess.CompletedProcess:
    """`sage-stream run` in `root`, in this process (the exit status is main's return value,
    what `python -m sage_stream` exits with; tests/e2e/test_bad_input.py runs one process)."""
    args = ["run", *urls, "--out", str(root / "out"), "--keep", "0.5", "--ell", "4",
            "--device", "cpu", "--no-progress", *extra]  # fmt: skip
    return cli_here(args, cwd=root)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--model", "usermodels:broken"],
         "model factory 'usermodels:broken' failed: RuntimeError: cannot reach the weights "
         "server (run with -v for the traceback)"),
        (["--model", "usermodels:fine", "--preprocess", "userprep:decode"],
         "importing 'userprep' for 'userprep:decode' failed: ValueError: no such vocabulary: "
         "v2 (run with -v for the traceback)"),
    ],
)  # fmt: skip
def test_failing_user_code_is_one_line_and_its_traceback_is_under_v(job, options, needle):
    root, urls = job
    done = cli(root, urls, *options)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"sage-stream: error: {needle}"]
    verbose = cli(root, urls, *options, "-v")
    assert verbose.returncode == 2
    assert "Traceback" in verbose.stderr and needle in verbose.stderr
    assert ('usermodels.py", line 5, in broken' in verbose.stderr
            or 'userprep.py", line 1' in verbose.stderr)  # fmt: skip
