"""What every benchmark script shares: the command line, the child-process runner, results.

Where it sits: `memory.py`, `throughput.py`, `peers.py` and `gpu.py` are plain scripts; each
parses the common flags here, runs its cases through `run_case` and writes one JSON file with
`write_results`. A case runs in a child process (`cases.py`) so that its peak memory is its
own: the parent reads the child's peak RSS from `os.wait4` when it ends, and the child reports
the peak of each phase from /proc/self/status VmHWM (reset between phases). Each case has a
wall-clock cap and an address-space cap, so a method that runs out is recorded as "timeout" or
"oom" at that N instead of being left running.

The address-space cap (RLIMIT_AS) counts from what the child has mapped once torch is imported:
`--mem-gib` is what the case may map beyond that. torch's own libraries differ by build, and a
cap on the total would mean another budget on each: the CPU build maps about 0.6 GiB at import,
the CUDA build (PyPI's default on Linux) about 3 GiB even on a machine without a GPU, so a 2 GiB
total cap stopped the CUDA build's child at `import torch` ("failed to map segment"), an error
instead of an "oom".

Threads: each case gets `--threads` BLAS/OpenMP threads (default 1). On a 2-core machine shared
with other jobs, multithreaded BLAS spins and the same pass 1 ran 21× slower (see
docs/benchmarks.md); one thread per case keeps ratios between methods meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CASES = HERE / "cases.py"
GIB = 2**30
_LOAD_AT_START: list[float] = []  # set by start(): the machine's load when the script began


@dataclass(frozen=True)
class Caps:
    timeout_s: float = 600.0
    mem_gib: float = 20.0


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON results")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads per case")
    p.add_argument("--timeout", type=float, default=None, help="wall-clock cap per case, s")
    p.add_argument(
        "--mem-gib",
        type=float,
        default=20.0,
        help="address-space cap per case, GiB beyond what the case has mapped once torch is loaded",
    )
    return p


def cpu_parser(description: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that run on the CPU on one thread (scale, Ray): --quick,
    --results and --work; `write_results` records cpu and 1 thread for them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON results")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.set_defaults(device="cpu", threads=1)
    return p


def start(args: argparse.Namespace) -> None:
    """Check the device, fail early and clearly if `--device cuda` has no CUDA behind it, and
    give this parent process the same thread count as its cases."""
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        sys.exit(f"--device {args.device!r}: choose cpu or cuda")
    torch.set_num_threads(args.threads)
    _LOAD_AT_START[:] = [round(x, 2) for x in os.getloadavg()]


def work_dir(args: argparse.Namespace, name: str) -> Path:
    if args.work is not None:
        path = args.work / name
    else:
        path = Path(tempfile.gettempdir()) / f"sage-bench-{os.getuid()}" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
    return {name: n for name in names}


# How the child starts: `python -c _CAPPED_START BUDGET cases.py CASE PARAMS`. It imports torch,
# sets RLIMIT_AS to the address space mapped by then plus BUDGET bytes, and runs cases.py as
# `python cases.py CASE PARAMS` would (argv, sys.path[0], __main__).
_CAPPED_START = """
import os, resource, runpy, sys
import torch  # noqa: F401  (mapped before the cap: its size depends on the build)
with open("/proc/self/status") as status:
    mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
cap = mapped + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
sys.argv = sys.argv[2:]
if sys.path[:1] == [""]:  # python -c put the working folder first; a script has its own
    del sys.path[0]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def child_command(case: str, params: dict[str, Any], caps: Caps) -> list[str]:
    """The command line of one capped case (see _CAPPED_START)."""
    budget = str(int(caps.mem_gib * GIB))
    return [sys.executable, "-c", _CAPPED_START, budget, str(CASES), case, json.dumps(params)]


def run_case(case: str, params: dict[str, Any], caps: Caps, threads: int = 1) -> dict[str, Any]:
    """Run `cases.py CASE PARAMS` in a child; returns its result with status and peak RSS.

    status: "ok"; "oom" (an allocation failed under the cap, or the kernel killed it);
    "timeout" (killed at the wall-clock cap); "error" (with the child's last stderr line).
    """
    env = {**os.environ, **thread_env(threads), "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            child_command(case, params, caps),
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,  # its own process group, so a kill takes its helpers too
        )
        status, rusage, killed = _wait(proc, caps.timeout_s)
        wall = time.monotonic() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    result = _parse(stdout)
    result.update(case=case, params=params, child_wall_s=round(wall, 3))
    result["peak_rss_mib"] = round(rusage.ru_maxrss / 1024, 1)  # ru_maxrss is in KiB
    result["status"] = _status(result, status, killed, stderr)
    if result["status"] == "timeout":
        result["detail"] = f"killed at the {caps.timeout_s:.0f} s cap"
    elif result["status"] != "ok" and "detail" not in result:
        result["detail"] = _last_line(stderr)
    return result


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[int, Any, bool]:
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = status  # reaped here, so Popen must not wait for it again
            return status, rusage, False
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            _, status, rusage = os.wait4(proc.pid, 0)
            proc.returncode = status
            return status, rusage, True
        time.sleep(0.05)


def _parse(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {}


def _status(result: dict, status: int, killed: bool, stderr: str) -> str:
    if killed:
        return "timeout"
    if "status" in result:  # the child said (ok, or oom caught as MemoryError)
        return result["status"]
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "oom"  # not killed by us: the kernel's OOM killer
    if "can't allocate memory" in stderr or "MemoryError" in stderr:
        return "oom"
    return "error"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("sage-stream", "torch", "numpy", "cords", "apricot-select", "traker"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine(device: str, threads: int) -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "threads_per_case": threads,
        "load_average_at_start": _LOAD_AT_START or None,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "device": device,
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_results(args: argparse.Namespace, name: str, body: dict[str, Any]) -> Path:
    """results/<name>-<device>[-quick].json with the machine, versions and the command."""
    args.results.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    path = args.results / f"{name}-{body.pop('device_slug', args.device)}{suffix}.json"
    record = {
        "benchmark": name,
        "mode": "quick" if args.quick else "full",
        "command": command(),
        "machine": machine(args.device, args.threads),
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **body,
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
    return path


def command() -> str:
    """This script's command line, with the script's path relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(HERE.parent))
    except ValueError:
        shown = sys.argv[0]
    return " ".join(["python", shown, *sys.argv[1:]])


def rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None
