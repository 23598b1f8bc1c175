"""Read shards each in a forked child under CPU-time and memory limits (hostile header tests).

Run as ``python -m bounded_read SHARD...`` (cwd tests/helpers): the process imports the reader
once, then forks one child per shard. The child sets ``RLIMIT_CPU`` and ``RLIMIT_AS`` (its
address space at the fork plus ``EXTRA_MIB``), reads every sample with ``formats.read_shard``
and reports through a pipe; the parent kills a child that outlives ``WALL_S``. One JSON line
per shard on stdout:

    {"shard": ..., "status": "ok" | "timeout" | "signal 24" | "exit 1",
     "samples": n, "errors": [reason, ...], "shard_error": str | null,
     "crash": "TypeError: ..." | null, "growth_kib": peak RSS over the RSS at the fork}

A hang ends as ``timeout`` or ``signal 24`` (SIGXCPU), unbounded memory as a ``MemoryError``
crash (or a signal), and any exception other than ShardError as ``crash``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time

from sage_stream.errors import ShardError
from sage_stream.formats import read_shard
from sage_stream.inputs import expand_inputs

CPU_S = 5
WALL_S = 20.0
EXTRA_MIB = 192


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def _read(path: str) -> dict:
    start_rss = _status_kib("VmRSS")
    result: dict = {"samples": 0, "errors": [], "shard_error": None, "crash": None}
    try:
        (ref,) = expand_inputs([path])
        for sample in read_shard(ref):
            result["samples"] += 1
            if sample.error is not None:
                result["errors"].append(sample.error)
    except ShardError as e:
        result["shard_error"] = str(e)
    except BaseException as e:  # noqa: BLE001 - a crash is what the test looks for
        result["crash"] = f"{type(e).__name__}: {e}"[:500]
    result["growth_kib"] = _status_kib("VmHWM") - start_rss
    return result


def _child(path: str, out: int) -> None:
    limit = _status_kib("VmSize") * 1024 + EXTRA_MIB * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_S, CPU_S))
    os.write(out, json.dumps(_read(path)).encode())
    os._exit(0)


def run_one(path: str) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _child(path, w)
        finally:
            os._exit(3)
    os.close(w)
    deadline = time.monotonic() + WALL_S
    status = None
    while status is None:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = code
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -1
        else:
            time.sleep(0.005)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    if status == -1:
        return {"status": "timeout"}
    if os.WIFSIGNALED(status):
        return {"status": f"signal {os.WTERMSIG(status)}"}
    if os.WEXITSTATUS(status) != 0 or not data:
        return {"status": f"exit {os.WEXITSTATUS(status)}"}
    return {"status": "ok", **json.loads(data)}


if __name__ == "__main__":
    for shard in sys.argv[1:]:
        print(json.dumps({"shard": shard, **run_one(shard)}), flush=True)
