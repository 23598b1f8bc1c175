"""The four benchmarks of docs/benchmarks.md sections 1-4 in one run, then their plots.

Runs memory.py, throughput.py, peers.py and gpu.py one after another with the same flags, so
that ratios within each come from one run on one machine state; then report.py draws the plots
(when matplotlib is there). peers.py runs under `benchmarks/.venv-peers/bin/python` when that
environment exists (see setup_peers.sh), so that CORDS and TRAK are included.

    python benchmarks/run_all.py --quick                   # CI smoke run, under a minute
    python benchmarks/run_all.py                           # the figures in docs/benchmarks.md
    python benchmarks/run_all.py --device cuda             # on a machine with a GPU

It does not run the other drivers, which each answer one question with their own flags and
run on their own: loader.py, fd_speed.py, s3_read.py (needs an S3 endpoint), hostile_memory.py,
scale_run.py, scale_select.py, ray_workers.py (needs ray), quality.py and quality_rank.py
(docs/quality.md), dedup_study.py, and golden.py (before/after digests of a change).

benchmarks/ is drivers (the scripts above, run as `python benchmarks/NAME.py`) over a small
library they import: common.py (flags, the capped child runner, results), data.py (synthetic
data and models), cases.py (the child's entry point) with sage_cases.py, gpu_cases.py and
peer_cases.py (the cases it runs), quality_data.py, quality_signals.py, quality_report.py,
subset_quality.py and plots.py. The library never imports a driver.
"""

from __future__ import annotations

import subprocess
import sys
import time

from common import HERE, parser

PEERS_PYTHON = HERE / ".venv-peers" / "bin" / "python"
SCRIPTS = ("memory.py", "throughput.py", "peers.py", "gpu.py")


def forwarded(args) -> list[str]:  # noqa: ANN001
    flags = [
        "--device",
        args.device,
        "--results",
        str(args.results),
        "--threads",
        str(args.threads),
    ]
    flags += ["--mem-gib", str(args.mem_gib)]
    if args.quick:
        flags.append("--quick")
    if args.work is not None:
        flags += ["--work", str(args.work)]
    if args.timeout is not None:
        flags += ["--timeout", str(args.timeout)]
    return flags


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=SCRIPTS, help="run only these scripts")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args()
    failed = []
    for script in args.only or SCRIPTS:
        python = PEERS_PYTHON if script == "peers.py" and PEERS_PYTHON.exists() else sys.executable
        start = time.monotonic()
        code = subprocess.call([str(python), str(HERE / script), *forwarded(args)])
        print(f"== {script}: exit {code} in {time.monotonic() - start:.0f} s", flush=True)
        if code:
            failed.append(script)
    if not args.no_plots and not args.quick:
        python = PEERS_PYTHON if PEERS_PYTHON.exists() else sys.executable
        subprocess.call([str(python), str(HERE / "report.py"), "--results", str(args.results)])
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
