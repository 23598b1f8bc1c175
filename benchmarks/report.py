"""Tables (markdown, on stdout) and plots (docs/benchmarks-*.png) from results/*.json.

Where it sits: the last step of run_all.py. It only reads the JSON the benchmark scripts
wrote, so every figure in docs/benchmarks.md can be traced to a results file and its command.
Plots need matplotlib (in benchmarks/.venv-peers); without it only the tables are printed.

    benchmarks/.venv-peers/bin/python benchmarks/report.py [--device cpu]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"


def load(results: Path, name: str, device: str) -> dict[str, Any] | None:
    path = results / f"{name}-{device}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def memory_table(m: dict[str, Any]) -> str:
    rows = [
        [f"{r['n']:,}", r["status"], r.get("sketch_peak_rss_mib"), r.get("score_peak_rss_mib"),
         r.get("child_peak_rss_mib"), r.get("sketch_samples_per_s"), r.get("score_samples_per_s")]
        for r in m["rows"]
    ]  # fmt: skip
    header = ["N", "status", "sketch peak RSS MiB", "score peak RSS MiB", "child peak MiB",
              "sketch samples/s", "score samples/s"]  # fmt: skip
    return table(header, rows)


def throughput_table(t: dict[str, Any]) -> str:
    p = t["passes"]
    rows = [[name, v, p["wall_s"][name]] for name, v in p["samples_per_s"].items()]
    ratios = (
        f"sketch_over_forward = {p['sketch_over_forward']}, score_over_forward = "
        f"{p['score_over_forward']}, emit_over_raw_copy = {p['emit_over_raw_copy']}"
    )
    return table(["step", "samples/s", "wall s"], rows) + "\n\n" + ratios


def fd_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["D", "ℓ", "rows timed", "rows/s"],
        [[f"{r['dim']:,}", r["ell"], r["rows"], r["rows_per_s"]] for r in rows],
    )


def peers_table(p: dict[str, Any]) -> str:
    rows = []
    for r in p["rows"]:
        value = r.get("total_s") if r["status"] == "ok" else f"{r['status']}: {r.get('detail')}"
        rows.append([r["method"], f"{r['n']:,}", value, r.get("peak_rss_mib"), r.get("kept")])
    return table(["method", "N", "time s (load + select)", "peak RSS MiB", "kept"], rows)


def quality_table(q: dict[str, Any]) -> str:
    rows = [
        [name, r["kept"], r["weighted"], r["test_accuracy_mean"], r["test_accuracy_runs"],
         r["flipped_share_kept"]]
        for name, r in q["methods"].items()
    ]  # fmt: skip
    header = ["kept set", "size", "weighted", "test accuracy (mean)", "per seed",
              "flipped labels kept"]  # fmt: skip
    return table(header, rows)


def gpu_table(g: dict[str, Any]) -> str:
    rows = [[name, v] for name, v in g["samples_per_s"].items()]
    extra = f"sketch_over_forward = {g['sketch_over_forward']}"
    return table(["step", "samples/s"], rows) + "\n\n" + extra + "\n\n" + fd_table(g["fd"])


def print_tables(results: Path, device: str) -> dict[str, Any]:
    found = {n: load(results, n, device) for n in ("memory", "throughput", "peers", "gpu")}
    makers = {
        "memory": lambda d: memory_table(d),
        "throughput": lambda d: throughput_table(d) + "\n\n" + fd_table(d["fd"]["rows"]),
        "peers": lambda d: peers_table(d) + "\n\n" + quality_table(d["quality"]),
        "gpu": lambda d: gpu_table(d) if d.get("status") == "ok" else d.get("detail", ""),
    }
    for name, data in found.items():
        if data is not None:
            print(f"\n### {name} ({data['command']})\n\n{makers[name](data)}")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--device", default="cpu", help="the device part of the file names")
    args = p.parse_args()
    found = print_tables(args.results, args.device)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed here: no plots (run benchmarks/setup_peers.sh)")
        return
    from plots import draw_all

    for path in draw_all(found, DOCS):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
