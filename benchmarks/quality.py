"""Quality benchmark: on two data sets and four kinds of pool each, does training on what a
scorer kept beat a random subset of the same size, and training on everything?

The data (`quality_data.py`): scikit-learn's digits with the demo's MLP, and Synthetic Control
Chart series from the published generator with a small 1-D CNN (`quality_signals.py`); each as
label noise, near-copies, a long-tailed class mix and clean labels. For each scenario and
each scorer the stage runs as a user runs it: `sage_stream.run` once per scorer (a fresh OUT:
sketch if the scorer needs one, score, select, emit), then `sage_stream.select` + `emit` on the
same OUT for the other keep fractions and seeds (a selection is redone on the same scores, as
`sage-stream select` and `emit` do). The emitted subset is read back through the training feed
(`sage_stream.feed.SelectedDataset`), a fresh model of the data set's kind is trained on it
(300 full-batch Adam steps) and judged on the data set's clean held-out samples.

Seed s (0, 1, 2) varies the initial weights of the trained model, the seeded draws of the
`random` and `sage-coverage` scorers (`--seed s`) and the uniform random subset; the other
scorers' subsets do not depend on it.

    nice python benchmarks/quality.py      # 2 data sets x 4 scenarios x 3 keeps x 3 seeds
    python benchmarks/quality.py --quick   # 1 seed, keep 0.1: a smoke run

The full mode writes docs/quality.md (the part between its markers), docs/quality.png and
benchmarks/results/quality.json; `--quick` writes only where `--output-dir` says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import quality_report
import torch
from quality_data import BUILDERS, DATASETS, KEEPS, Scenario, prepare

import sage_stream
from sage_stream.demo import accuracy
from sage_stream.feed import DecodeScored, SelectedDataset

ROOT = Path(__file__).resolve().parents[1]
SCORERS = ("sage-coverage", "sage", "loss-easy", "loss", "grad-norm", "random")
SEEDED = ("random", "sage-coverage")  # scorers whose subset depends on --seed


class KeyedDecode:
    """Feed decode: sample -> (pool index, x, label); the shards' keys are the pool indices."""

    def __init__(self) -> None:
        self.decode = DecodeScored(label_key="cls")

    def __call__(self, sample: dict) -> tuple[int, torch.Tensor, int]:
        x, label, _ = self.decode(sample)
        return int(sample["__key__"]), x, label


def emitted(sc: Scenario, out: Path, scorer: str, keep: float, seed: int) -> np.ndarray:
    """Select and emit with one scorer (a full run the first time); the pool indices read back
    from the emitted shards, after checking the feed gives the shards' pixels and labels."""
    options = {"keep": keep, "scorer": scorer, "seed": seed}
    if (out / "scores").exists():
        sage_stream.select(out=str(out), **options)
        sage_stream.emit(sc.urls, out=str(out), progress=False)
    else:
        sage_stream.run(sc.urls, model=sc.data.model, checkpoint=sc.checkpoint, out=str(out),
                        device="cpu", progress=False, **options)  # fmt: skip
    rows = list(SelectedDataset(str(out), decode=KeyedDecode()))
    index = np.array([i for i, _, _ in rows], dtype=np.int64)
    x = torch.stack([x for _, x, _ in rows]).numpy() if rows else sc.x[:0]
    labels = np.array([label for _, _, label in rows], dtype=np.int64)
    if not (np.array_equal(labels, sc.y[index]) and np.allclose(x, sc.x[index])):
        raise RuntimeError(f"{sc.data.name} {sc.name} {scorer} {keep}: the feed differs")
    return index


def fit(sc: Scenario, index: np.ndarray, seed: int) -> float:
    return accuracy(sc.data.train(sc.x[index], sc.y[index], seed=seed), sc.x_test, sc.y_test)


def summary(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"values": arr.round(4).tolist(), "mean": float(arr.mean()), "std": std}


def cell(sc: Scenario, subsets: list[np.ndarray], seeds: Sequence[int]) -> dict[str, Any]:
    """Accuracy, distinct share and flipped share over the seeds (one subset per seed)."""
    accs = [fit(sc, idx, seed) for idx, seed in zip(subsets, seeds, strict=True)]
    return {
        "n": sorted({len(i) for i in subsets}),
        "accuracy": summary(accs),
        "distinct_share": summary([len(np.unique(sc.group[i])) / len(i) for i in subsets]),
        "flipped_share": summary([float((sc.y[i] != sc.y_clean[i]).mean()) for i in subsets]),
    }


def measure_scenario(sc: Scenario, work: Path, scorers: Sequence[str], seeds: Sequence[int],
                     earlier: dict[str, Any] | None = None):  # fmt: skip
    """Every scorer's cells; with `earlier` (the same scenario from a report of the same data
    and seeds), the random subset and the whole pool are taken from it, not trained again;
    with `earlier` = {} they are not measured (--no-baselines)."""
    results: dict[str, dict[str, Any]] = {s: {} for s in [*scorers, "random-subset"]}
    for keep in sc.keeps:
        sizes = set()
        for scorer in scorers:
            started, out = time.monotonic(), work / sc.data.name / sc.name / scorer
            subsets: list[np.ndarray] = []
            for seed in seeds:
                if not subsets or scorer in SEEDED:
                    subsets.append(emitted(sc, out, scorer, keep, seed))
                else:
                    subsets.append(subsets[0])
            results[scorer][str(keep)] = cell(sc, subsets, seeds)
            sizes |= set(results[scorer][str(keep)]["n"])
            acc = results[scorer][str(keep)]["accuracy"]["mean"]
            print(f"{sc.data.name:>7} {sc.name:>11} {scorer:>13} keep {keep}: {acc:.3f} "
                  f"({time.monotonic() - started:.1f} s)", file=sys.stderr)  # fmt: skip
        if len(sizes) != 1:
            raise RuntimeError(f"{sc.name} keep {keep}: scorers kept different sizes {sizes}")
        n = sizes.pop()
        if earlier == {}:  # --no-baselines: --render --merge takes them from the other report
            results.pop("random-subset", None)
            continue
        if earlier is not None:
            results["random-subset"][str(keep)] = earlier["results"]["random-subset"][str(keep)]
            continue
        draws = [np.sort(np.random.default_rng(1000 + s).choice(len(sc.y), n, replace=False))
                 for s in seeds]  # fmt: skip
        results["random-subset"][str(keep)] = cell(sc, draws, seeds)
    if earlier == {}:
        return results, None
    if earlier is not None:
        return results, earlier["full"]
    everything = np.arange(len(sc.y))
    full = cell(sc, [everything] * len(seeds), seeds)
    return results, full


def merged(results: dict[str, Any], earlier: dict[str, Any] | None) -> dict[str, Any]:
    """The scorers measured now, then those only `earlier` has (in its order)."""
    if earlier is None:
        return results
    rest = {k: v for k, v in earlier["results"].items() if k not in results}
    ordered = {k: results.get(k, rest.get(k)) for k in earlier["results"]}
    return {**ordered, **{k: v for k, v in results.items() if k not in ordered}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, keep 0.1")
    p.add_argument("--data", default=",".join(DATASETS), help="comma-separated data sets")
    p.add_argument("--scenarios", default=",".join(BUILDERS), help="comma-separated scenarios")
    p.add_argument("--scorers", default=",".join(SCORERS), help="comma-separated scorers")
    p.add_argument("--keeps", help="comma-separated keep fractions (default 0.05,0.1,0.3)")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3, quick 1)")
    p.add_argument("--output-dir", type=Path, help="write quality.md/.png/.json here instead")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-baselines", action="store_true", help="measure neither the random "
                   "subset nor the whole pool (for --render --merge with a report that has them)")  # fmt: skip
    p.add_argument("--render", help="measure nothing: write the tables and plot of these "
                   "quality.json (comma-separated; with --merge: and of the scorers only that "
                   "one has)")  # fmt: skip
    p.add_argument("--merge", type=Path, help="a quality.json of the same data and seeds: the "
                   "scorers not run now, the random subset and the whole pool come from it")  # fmt: skip
    return p.parse_args(argv)


def outputs(args: argparse.Namespace) -> dict[str, Path] | None:
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        return {ext: args.output_dir / f"quality.{ext}" for ext in ("md", "png", "json")}
    if args.quick:
        return None
    return {
        "md": ROOT / "docs" / "quality.md",
        "png": ROOT / "docs" / "quality.png",
        "json": ROOT / "benchmarks" / "results" / "quality.json",
    }


def render(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """A report measured earlier, with the scorers only --merge's report has added."""
    parts = [json.loads(Path(p).read_text()) for p in args.render.split(",")]
    report = parts[0]
    for other in parts[1:]:  # runs of other data sets, scenarios or scorers: one report
        for name, sc in other["scenarios"].items():
            if name in report["scenarios"]:
                report["scenarios"][name]["results"].update(sc["results"])
            else:
                report["scenarios"][name] = sc
        report["scorers"] += [s for s in other["scorers"] if s not in report["scorers"]]
        report["seconds"] += other["seconds"]
        report["command"] += " and " + other["command"]
    if args.merge:
        before = json.loads(args.merge.read_text())
        if before["seeds"] != report["seeds"]:
            raise SystemExit(f"--merge {args.merge}: other seeds than {args.render}")
        if set(before["scenarios"]) != set(report["scenarios"]):
            raise SystemExit(f"--merge {args.merge}: other scenarios than {args.render}")
        for name, sc in report["scenarios"].items():
            sc["results"] = merged(sc["results"], before["scenarios"][name])
            sc["full"] = sc["full"] or before["scenarios"][name]["full"]
        report["scorers"] = before["scorers"]
        report["merged"] = {"measured": report["command"], "others": before["command"],
                            "others_seconds": before["seconds"]}  # fmt: skip
        report["command"] = " ".join(["python benchmarks/quality.py", *(argv or sys.argv[1:])])
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        return write(render(args, argv), outputs(args))
    torch.set_num_threads(args.threads)  # tiny models: more threads only contend
    scorers = [s for s in args.scorers.split(",") if s]
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    started = time.monotonic()
    scenarios: dict[str, Any] = {}
    before = json.loads(args.merge.read_text()) if args.merge else None
    if before is not None and before["seeds"] != seeds:
        raise SystemExit(f"--merge {args.merge}: seeds {before['seeds']}, not {seeds}")
    with tempfile.TemporaryDirectory(prefix="sage-quality-") as work:
        keeps = KEEPS if not args.quick else (0.1,)
        if args.keeps:
            keeps = tuple(float(k) for k in args.keeps.split(","))
        for data in [d for d in args.data.split(",") if d]:
            for name in [s for s in args.scenarios.split(",") if s]:
                sc = prepare(data, name, Path(work), keeps)
                earlier = (before or {}).get("scenarios", {}).get(f"{data}/{name}")
                if args.no_baselines:
                    earlier = {}
                results, full = measure_scenario(sc, Path(work), scorers, seeds, earlier)
                results = merged(results, earlier or None)
                scenarios[f"{data}/{name}"] = {**sc.describe(), "results": results, "full": full,
                                               "test_size": len(sc.y_test)}  # fmt: skip
    report = {
        "command": " ".join(["python benchmarks/quality.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch thread(s)",
        "seconds": time.monotonic() - started,
        "seed_varies": "init of the trained model, the seeded scorers' draws, the random subset",
        "scorers": list(before["scorers"]) if before else scorers,
        "measured_now": scorers,
        "merged_from": str(args.merge) if args.merge else None,
        "seeds": seeds,
        "scenarios": scenarios,
        "versions": {"sage-stream": sage_stream.__version__, "torch": torch.__version__},
    }
    return write(report, outputs(args))


def write(report: dict[str, Any], paths: dict[str, Path] | None) -> dict[str, Any]:
    block = quality_report.write_markdown(report, paths["md"] if paths else None)
    print(block)
    if paths is not None:
        quality_report.plot(report, paths["png"])
        paths["json"].parent.mkdir(parents=True, exist_ok=True)
        paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
