"""One benchmark case per child process: `python cases.py CASE 'JSON PARAMS'`.

Where it sits: `common.run_case` starts this script with a memory and time cap; it runs one
case and prints `RESULT {json}` as its last line. The cases themselves live in the library
modules: the SAGE passes and FD (sage_cases.py), the accelerator run (gpu_cases.py) and the
peers (peer_cases.py: exact SVD, CORDS, TRAK). None of them imports this script or a driver.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from gpu_cases import measure  # benchmarks/ is on sys.path: this script's folder
from peer_cases import PEERS
from sage_cases import case_fd, case_sage, case_throughput


def case_allocate(p: dict[str, Any]) -> dict[str, Any]:
    """Touch `gib` GiB at once (tests/test_benchmarks.py checks that the cap reports "oom")."""
    torch.ones(int(p["gib"] * 2**30), dtype=torch.uint8)
    return {}


def case_sleep(p: dict[str, Any]) -> dict[str, Any]:
    """Sleep (tests/test_benchmarks.py checks that the wall-clock cap reports "timeout")."""
    time.sleep(p["seconds"])
    return {}


def _registry() -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    cases = {"sage": case_sage, "fd": case_fd, "throughput": case_throughput, "gpu": measure}
    cases.update(PEERS)
    return {**cases, "allocate": case_allocate, "sleep": case_sleep}


def main() -> None:
    case, params = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    np.random.seed(0)
    try:
        result = {"status": "ok", **_registry()[case](params)}
    except MemoryError as exc:
        result = {"status": "oom", "detail": f"MemoryError: {exc}"[:300]}
    except RuntimeError as exc:
        if "allocate" not in str(exc) and "out of memory" not in str(exc):
            raise
        result = {"status": "oom", "detail": str(exc).splitlines()[0][:300]}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
