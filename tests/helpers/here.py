"""`sage-stream ARGS` run in this process, for runs that need no process of their own (a
reference run, a resume, a run that stops at set-up), where a subprocess would spend most of
its time importing torch again.

The runs that are killed or signalled stay subprocesses. `cli_here` gives what
`subprocess.run(..., capture_output=True, text=True)` gives for `python -m sage_stream ARGS`:
the exit status, stdout, and stderr with the command's log lines in it (the root logger is the
command's own while it runs, as in a fresh process, and pytest's afterwards).
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from paths import environ


def cli_here(
    args: Sequence[str], cwd: str | Path, env: dict[str, str] | None = None,
    hostname: str | None = None,
) -> subprocess.CompletedProcess:  # fmt: skip
    """`main(args)` with `env` added to os.environ and in `cwd`, all restored after; with
    `hostname`, the run believes it is on that host (a new pod, as killpoints' variable)."""
    from sage_stream.cli import main

    out, err = io.StringIO(), io.StringIO()
    with (
        environ(env or {}), contextlib.chdir(cwd), _syspath(), _hostname(hostname),
        _own_root_logger(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
    ):  # fmt: skip
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _syspath() -> Iterator[None]:
    """sys.path as it was: the command puts its working directory first (as `python -m`)."""
    saved = sys.path[:]
    try:
        yield
    finally:
        sys.path[:] = saved


@contextlib.contextmanager
def _hostname(name: str | None) -> Iterator[None]:
    real = socket.gethostname
    if name is not None:
        socket.gethostname = lambda: name
    try:
        yield
    finally:
        socket.gethostname = real


@contextlib.contextmanager
def _own_root_logger() -> Iterator[None]:
    """No handlers on the root logger, so that the command's `logging.basicConfig` installs its
    own (on the redirected stderr); pytest's handlers and level come back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = []
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
