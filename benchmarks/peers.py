"""Issue 5.3, peers: SAGE against an exact SVD by hand, CORDS CRAIG and GradMatch, and TRAK,
on the same shards, proxy model, last-layer gradient features and keep fraction.

For each method and each N the case runs in a child process with a wall-clock and a memory
cap (see common.run_case); a method that runs out at some N is recorded there ("timeout" or
"oom") and not tried at larger N. Ratios are taken at the largest N both finished. At one N
(`quality_n`) every method also saves its kept set, and a fresh model is trained on each kept
set (same recipe, 3 seeds) and tested on clean held-out data: see `subset_quality`.

Peers come from their own environment (`bash benchmarks/setup_peers.sh`); run this script with
`benchmarks/.venv-peers/bin/python` to include them. A peer that is not installed is recorded
as "not installed", with the reason.

    benchmarks/.venv-peers/bin/python benchmarks/peers.py          # full: N = 2k, 8k, 32k, 128k
    benchmarks/.venv-peers/bin/python benchmarks/peers.py --quick  # N = 400
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import Caps, parser, run_case, start, work_dir, write_results
from data import BlobSpec, proxy_checkpoint, write_blob_shards
from subset_quality import subset_quality

METHODS = ("sage", "hand_svd", "craig", "gradmatch", "trak")
NEEDS = {"craig": ("cords", "apricot"), "gradmatch": ("cords",), "trak": ("trak",)}
KEEP = 0.3


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sizes": [400], "per_shard": 200, "quality_n": 400, "timeout": 120,
                "targets": 100, "proj_dim": 128, "seeds": 1, "epochs": 3}  # fmt: skip
    return {"sizes": [2000, 8000, 32000, 128000], "per_shard": 1000, "quality_n": 8000,
            "timeout": 240, "targets": 500, "proj_dim": 1024, "seeds": 3, "epochs": 20}  # fmt: skip


def missing(method: str) -> str | None:
    """Why a peer cannot run in this interpreter, or None."""
    for module in NEEDS.get(method, ()):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed here (run benchmarks/setup_peers.sh)"
    return None


def case_params(args, spec, s, root: Path, method: str, n: int) -> dict[str, Any]:  # noqa: ANN001
    out = root / f"out-{method}-{n}"
    out.mkdir(parents=True, exist_ok=True)
    params = {
        "spec": asdict(spec),
        "checkpoint": s["checkpoint"],
        "shards": write_blob_shards(root / "shards", spec, n, s["per_shard"]),
        "out": str(out),
        "n": n,
        "per_shard": s["per_shard"],
        "keep": KEEP,
        "device": args.device,
        "phases": ["sketch", "score", "select"],
        "targets": s["targets"],
        "proj_dim": s["proj_dim"],
    }
    if n == s["quality_n"]:
        params["save"] = str(root / f"kept-{method}-{n}.npz")
    return params


def row_of(method: str, n: int, result: dict[str, Any]) -> dict[str, Any]:
    row = {"method": method, "n": n, "status": result["status"]}
    if result["status"] != "ok":
        return {**row, "detail": result.get("detail"), "peak_rss_mib": result.get("peak_rss_mib")}
    phases = result["phases"]
    row.update(
        total_s=round(sum(p["wall_s"] for p in phases.values()), 3),
        peak_rss_mib=result["peak_rss_mib"],
        baseline_rss_mib=result.get("baseline_rss_mib"),
        kept=result.get("kept"),
        phases=phases,
    )
    if result.get("log"):
        row["log"] = result["log"]
    return row


def ladder(args, spec: BlobSpec, s: dict[str, Any], root: Path) -> list[dict[str, Any]]:  # noqa: ANN001
    caps = Caps(args.timeout or s["timeout"], args.mem_gib)
    rows = []
    for method in METHODS:
        failed: dict[str, Any] | None = None
        for n in s["sizes"]:
            if missing(method):
                row = {
                    "method": method,
                    "n": n,
                    "status": "not installed",
                    "detail": missing(method),
                }
            elif failed is not None:
                row = {"method": method, "n": n, "status": "skipped",
                       "detail": f"{failed['status']} at N={failed['n']}"}  # fmt: skip
            else:
                params = case_params(args, spec, s, root, method, n)
                row = row_of(method, n, run_case(method, params, caps, args.threads))
                failed = row if row["status"] != "ok" else None
            print({k: v for k, v in row.items() if k != "phases"})
            rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Peer / SAGE time and peak RSS at the largest N both finished."""
    ok = {(r["method"], r["n"]): r for r in rows if r["status"] == "ok"}
    found = {}
    for method in METHODS[1:]:
        both = [n for (m, n) in ok if m == method and ("sage", n) in ok]
        if not both:
            continue
        n = max(both)
        peer, sage = ok[(method, n)], ok[("sage", n)]
        found[method] = {
            "n": n,
            "time_over_sage": round(peer["total_s"] / sage["total_s"], 3),
            "peak_rss_over_sage": round(peer["peak_rss_mib"] / sage["peak_rss_mib"], 3),
        }
    return found


def main() -> None:
    args: argparse.Namespace = parser(__doc__.splitlines()[0]).parse_args()
    start(args)
    spec, s = BlobSpec(), settings(args.quick)
    root = work_dir(args, "peers")
    s["checkpoint"] = proxy_checkpoint(root, spec, quick=args.quick)
    rows = ladder(args, spec, s, root)
    kept = {m: root / f"kept-{m}-{s['quality_n']}.npz" for m in METHODS}
    quality = subset_quality(spec, s, {m: p for m, p in kept.items() if p.exists()}, KEEP)
    body = {
        "spec": {**asdict(spec), "grad_dim": spec.grad_dim, "ell": 256, "keep": KEEP},
        "settings": {k: v for k, v in s.items() if k != "checkpoint"},
        "caps": {"timeout_s": args.timeout or s["timeout"], "mem_gib": args.mem_gib},
        "rows": rows,
        "ratios_at_largest_common_n": ratios(rows),
        "quality": quality,
    }
    write_results(args, "peers", body)


if __name__ == "__main__":
    main()
