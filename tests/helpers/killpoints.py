"""SIGKILL at a named point of a run's commit, for fault tests; imported before the CLI runs.

SAGE_TEST_KILL_POINT names where the process kills itself:
  select    in the middle of writing selection.parquet (some bytes written)
  manifest  in the middle of writing manifest.json
  index     after manifest.json is in place, before shardindex.json is written
  success   after _SUCCESS, before the run's scratch and its lease are removed
  emit      as emit starts on its second shard
  replay    as pass 2 starts on the second shard pass 1 kept (passes/kept.py)
Unset, nothing is changed. SAGE_TEST_KILL_SIGNAL=TERM sends SIGTERM instead of SIGKILL (an
orchestrator's stop); SAGE_TEST_HOSTNAME makes the run believe it is on that host (a new pod). `python -m killpoints ARGS...` runs `sage-stream ARGS...` armed.
"""

import contextlib
import os
import signal
import socket
import sys

from sage_stream.outputs.folder import OutputFolder

POINT = os.environ.get("SAGE_TEST_KILL_POINT")
SIGNAL = signal.Signals["SIG" + os.environ.get("SAGE_TEST_KILL_SIGNAL", "KILL")]


def _die() -> None:
    os.kill(os.getpid(), SIGNAL)


class _Dying:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        n = self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        _die()
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


def arm() -> None:
    real_writer, real_finish = OutputFolder.writer, OutputFolder.finish
    dying = {"select": "selection.parquet", "manifest": "manifest.json"}.get(POINT or "")

    @contextlib.contextmanager
    def writer(self, url):
        if POINT == "index" and url == self.index:
            _die()
        with real_writer(self, url) as f:
            yield _Dying(f) if dying and url.endswith("/" + dying) else f

    def finish(self):
        if POINT == "success":
            _die()
        real_finish(self)

    OutputFolder.writer, OutputFolder.finish = writer, finish
    if POINT == "emit":
        from sage_stream.passes import emit

        _die_on_second_call(emit, "emit_shard")
    if POINT == "replay":
        from sage_stream.passes import kept

        _die_on_second_call(kept, "_replay")
    if os.environ.get("SAGE_TEST_HOSTNAME"):
        socket.gethostname = lambda: os.environ["SAGE_TEST_HOSTNAME"]


def _die_on_second_call(module, name) -> None:
    real, calls = getattr(module, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _die()
        return real(*args, **kwargs)

    setattr(module, name, dying)


if __name__ == "__main__":
    arm()
    from sage_stream.cli import main

    sys.exit(main(sys.argv[1:]))
