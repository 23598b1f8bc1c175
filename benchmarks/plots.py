"""The plots of docs/benchmarks.md, from the results JSON (called by report.py).

Where it sits: after the benchmark scripts, before the docs. Needs matplotlib (installed in
benchmarks/.venv-peers, never a dependency of sage-stream).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"sage": "o", "hand_svd": "s", "craig": "^", "gradmatch": "v", "trak": "D"}


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_plot(memory: dict[str, Any], peers: dict[str, Any] | None, path: Path) -> Path:
    """Peak RSS against N: SAGE's two passes (memory.py) and every method's case (peers.py)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ok = [r for r in memory["rows"] if r["status"] == "ok"]
    for phase in ("sketch", "score"):
        ax.plot([r["n"] for r in ok], [r[f"{phase}_peak_rss_mib"] for r in ok], "o-",
                label=f"SAGE {phase} (memory.py)")  # fmt: skip
    for method, rows in _by_method(peers).items():
        ok = [r for r in rows if r["status"] == "ok"]
        ax.plot([r["n"] for r in ok], [r["peak_rss_mib"] for r in ok], "--",
                marker=MARKERS.get(method, "x"), label=f"{method} (peers.py, whole case)")  # fmt: skip
    ax.set(xscale="log", xlabel="samples N", ylabel="peak RSS (MiB)",
           title="Peak memory against N")  # fmt: skip
    ax.legend(fontsize=8)
    return _save(fig, path)


def _by_method(peers: dict[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for row in (peers or {}).get("rows", []):
        found.setdefault(row["method"], []).append(row)
    return found


def peers_time_plot(peers: dict[str, Any], path: Path) -> Path:
    """Time against N per method; a method that ran out is marked with an x at its cap."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cap = peers["caps"]["timeout_s"]
    for method, rows in _by_method(peers).items():
        ok = [r for r in rows if r["status"] == "ok"]
        (line,) = ax.plot([r["n"] for r in ok], [r["total_s"] for r in ok], "-",
                          marker=MARKERS.get(method, "x"), label=method)  # fmt: skip
        out = [r for r in rows if r["status"] in ("timeout", "oom")]
        ax.plot([r["n"] for r in out], [cap] * len(out), "x", ms=12, color=line.get_color())
        for r in out:  # say who ran out where: several methods may share the mark
            ax.annotate(f"{method}: {r['status']}", (r["n"], cap), fontsize=7, rotation=0,
                        xytext=(6, -10 - 9 * list(_by_method(peers)).index(method) % 27),
                        textcoords="offset points")  # fmt: skip
    ax.axhline(cap, color="grey", lw=0.8, ls=":", label=f"cap {cap:.0f} s")
    ax.set(xscale="log", yscale="log", xlabel="samples N", ylabel="seconds (load + select)",
           title="Selection time against N (x: ran out)")  # fmt: skip
    ax.legend(fontsize=8)
    return _save(fig, path)


def fd_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """FD update rows/s as D grows (at the most common ℓ) and as ℓ grows (at one D)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    ells = [r["ell"] for r in rows]
    ell0 = max(set(ells), key=ells.count)
    by_d = sorted((r for r in rows if r["ell"] == ell0), key=lambda r: r["dim"])
    left.plot([r["dim"] for r in by_d], [r["rows_per_s"] for r in by_d], "o-")
    left.set(xscale="log", yscale="log", xlabel="D", ylabel="rows/s", title=f"ℓ = {ell0}")
    dims = [r["dim"] for r in rows if r["ell"] != ell0]
    dim0 = dims[0] if dims else by_d[0]["dim"]
    by_l = sorted((r for r in rows if r["dim"] == dim0), key=lambda r: r["ell"])
    right.plot([r["ell"] for r in by_l], [r["rows_per_s"] for r in by_l], "o-")
    right.set(xscale="log", yscale="log", xlabel="ℓ", ylabel="rows/s", title=f"D = {dim0:,}")
    right.set_xticks([r["ell"] for r in by_l], [str(r["ell"]) for r in by_l], minor=False)
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(title)
    return _save(fig, path)


def draw_all(found: dict[str, Any], docs: Path) -> list[Path]:
    docs.mkdir(parents=True, exist_ok=True)
    paths = []
    if found.get("memory"):
        paths.append(
            memory_plot(found["memory"], found.get("peers"), docs / "benchmarks-memory.png")
        )
    if found.get("peers"):
        paths.append(peers_time_plot(found["peers"], docs / "benchmarks-peers-time.png"))
    throughput = found.get("throughput")
    if throughput and throughput["fd"].get("rows"):
        paths.append(fd_plot(throughput["fd"]["rows"], docs / "benchmarks-fd.png",
                             "Frequent Directions update rows/s (CPU)"))  # fmt: skip
    return paths
