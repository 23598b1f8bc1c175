"""Issue 5.1, constant memory: peak RSS of pass 1 (sketch), pass 2 (score) and of a selection
with near-copy removal (dedup_select) at N, 4N, 16N.

Each size runs in its own child process (cases.py `sage`, phases sketch then score) over tar
shards made here. Each phase's peak is VmHWM, reset when the phase starts (so the score
figure starts from what the process holds after sketching); the whole child's peak comes
from `os.wait4`. Streaming means the three sizes should give the same peaks: the script
reports peak(16N) / peak(N) for each phase.

    python benchmarks/memory.py            # full: N = 2,000 -> 2k, 8k, 32k samples
    python benchmarks/memory.py --quick    # N = 150, a smoke run
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import Caps, parser, rate, run_case, start, work_dir, write_results
from data import BlobSpec, proxy_checkpoint, write_blob_shards

PHASES = ("sketch", "score", "dedup_select")


def sizes(quick: bool) -> tuple[list[int], int]:
    """Sample counts and samples per shard."""
    return ([150, 600, 2400], 150) if quick else ([2000, 8000, 32000], 1000)


def measure(args: argparse.Namespace, spec: BlobSpec, root: Path) -> list[dict[str, Any]]:
    counts, per_shard = sizes(args.quick)
    checkpoint = proxy_checkpoint(root, spec, quick=args.quick)
    caps = Caps(args.timeout or (120 if args.quick else 900), args.mem_gib)
    rows = []
    for n in counts:
        params = {
            "spec": asdict(spec),
            "checkpoint": checkpoint,
            "shards": write_blob_shards(root / "shards", spec, n, per_shard),
            "out": str(root / f"out-{n}"),
            "n": n,
            "per_shard": per_shard,
            "device": args.device,
            "phases": list(PHASES),
        }
        result = run_case("sage", params, caps, args.threads)
        rows.append(summarize(n, result))
        print(f"N={n}: {rows[-1]}")
    return rows


def summarize(n: int, result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"n": n, "status": result["status"], "child_peak_rss_mib": None}
    if result["status"] != "ok":
        return {**row, "detail": result.get("detail")}
    row["child_peak_rss_mib"] = result["peak_rss_mib"]
    for name in PHASES:
        phase = result["phases"][name]
        row[f"{name}_peak_rss_mib"] = phase["peak_rss_mib"]
        row[f"{name}_samples_per_s"] = rate(n, phase["wall_s"])
        if "peak_cuda_mib" in phase:
            row[f"{name}_peak_cuda_mib"] = phase["peak_cuda_mib"]
    return row


def growth(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """peak at the largest size / peak at the smallest, per phase (1.0 = flat)."""
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) < 2:
        return {}
    first, last = ok[0], ok[-1]
    return {
        name: round(last[f"{name}_peak_rss_mib"] / first[f"{name}_peak_rss_mib"], 3)
        for name in PHASES
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    start(args)
    spec = BlobSpec()
    rows = measure(args, spec, work_dir(args, "memory"))
    body = {
        "spec": {**asdict(spec), "grad_dim": spec.grad_dim, "ell": 256, "batch_size": 256},
        "rows": rows,
        "peak_growth_largest_over_smallest": growth(rows),
    }
    write_results(args, "memory", body)


if __name__ == "__main__":
    main()
