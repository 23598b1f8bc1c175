"""Import only what a step needs: the command line's help and `inspect` never start torch
(STYLE 16; issue 24 item 5), and every module of the package imports on its own."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys

import pytest
from tiny import blobs, key, write_tar_set

import sage_stream

PROBE = """
import contextlib, io, sys
from sage_stream.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(sys.argv[1:]) if sys.argv[1:] else 0
    except SystemExit as done:
        code = done.code
heavy = sorted(m for m in ("torch", "PIL", "ray", "transformers") if m in sys.modules)
print(code, ",".join(heavy) or "-")
"""


def _probe(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("imports")
    x, _, y = blobs(48)
    urls = write_tar_set(root / "in", x, y, shards=2)
    out = root / "out"
    sage_stream.run(urls, model="tiny:mlp", out=str(out), keep=0.5, ell=4, device="cpu",
                    progress=False, loader_workers=0)  # fmt: skip
    return out


@pytest.mark.parametrize("argv", [(), ("--help",), ("select", "--help"), ("run", "--help")])
def test_the_command_line_and_its_help_do_not_start_torch(argv):
    assert _probe(*argv) == "0 -"


def test_inspect_does_not_start_torch(finished):
    for url in (finished, finished / "scores", finished / "sketch.zarr"):
        assert _probe("inspect", str(url)) == "0 -", url
    assert _probe("inspect", str(finished), "--key", key(0)) == "0 -"  # one sample's decision


def test_reading_scores_never_aborts_at_exit(finished):
    # pq.read_table on an open file went through pyarrow.dataset, whose threads could still run
    # at exit: a third of these runs aborted (exit 134) with pyarrow 26 before the fix.
    for _ in range(6):
        assert _probe("inspect", str(finished / "scores")) == "0 -"


def test_select_does_not_start_torch(finished):
    # a reselect reads scores and writes selection and decisions: no model, no torch (1.4 s)
    assert _probe("select", "--out", str(finished), "--keep", "0.25") == "0 -"


def test_every_module_imports_on_its_own():
    names = [m.name for m in pkgutil.walk_packages(sage_stream.__path__, "sage_stream.")]
    for name in names:
        if name != "sage_stream.__main__":  # runs the command line
            importlib.import_module(name)
    assert "sage_stream.select.bounded" in names and "sage_stream.decode.decoder" in names
