"""How sage-coverage's settings were chosen: its ranking with other constants, on the same scores.

For each scenario of `quality_data.py` the stage runs once (`sage_stream.run`, sage-coverage),
then `coverage.coverage_ranking` ranks its scores with each setting of the filter share q, the
τ cap (SUPPORT × mean τ; inf: none) and the temperature T of the draw (inf: uniform among the
passing); the top of each class by proportional quotas (as `select` takes them) trains a fresh
model per seed, tested as in `quality.py`. Prints, per cell, accuracy minus the random scorer's,
the flipped share and the distinct-digit share, and writes benchmarks/results/quality-sweep.json.

    cd benchmarks && python quality_sweep.py --seeds 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from quality_data import prepare

import sage_stream
from sage_stream.demo import accuracy
from sage_stream.select import coverage, orderings
from sage_stream.select.quotas import proportional_quotas

VARIANTS = [
    {"quantile": q, "support": c, "temperature": t}
    for q, c, t in itertools.product((0.0, 0.05, 0.2), (1.0, 1.5, 2.0, np.inf), (3.0, np.inf))
]


def kept(table: pa.Table, values: np.ndarray, keep: float) -> np.ndarray:
    """Pool indices of the top of each class by proportional quotas (ties: key order)."""
    labels = table["label"].to_numpy()
    classes, counts = np.unique(labels, return_counts=True)
    counted = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    quotas = proportional_quotas(counted, keep)
    keys = np.array([int(k) for k in table["__key__"].to_pylist()])
    out = []
    for c, n in quotas.items():
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(keys[members], kind="stable")]
        out += keys[members[np.argsort(-values[members], kind="stable")[:n]]].tolist()
    return np.sort(np.array(out))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="digits", help="a data set of quality_data.py")
    p.add_argument("--scenarios", default="label-noise,near-copies,long-tail,clean")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    found: dict = {}
    with tempfile.TemporaryDirectory(prefix="sage-sweep-") as work:
        for name in args.scenarios.split(","):
            sc = prepare(args.data, name, Path(work))
            out = Path(work) / args.data / name / "run"
            sage_stream.run(sc.urls, model=sc.data.model, keep=0.1,
                            checkpoint=sc.checkpoint, out=str(out), device="cpu",
                            progress=False)  # fmt: skip
            table = pq.read_table(out / "scores")
            table = table.filter(pc.equal(table["status"], "ok"))
            ok = np.ones(table.num_rows, dtype=bool)
            for keep in sc.keeps:
                rows = {}
                for label, rank in [("random", None), *[(json.dumps(v), v) for v in VARIANTS]]:
                    accs, flipped, distinct = [], [], []
                    for seed in range(args.seeds):
                        if rank is None:
                            values = orderings.ranking_values(table, "random", seed)
                        else:
                            values = coverage.coverage_ranking(table, ok, seed, **rank)
                        idx = kept(table, values, keep)
                        model = sc.data.train(sc.x[idx], sc.y[idx], seed=seed)
                        accs.append(accuracy(model, sc.x_test, sc.y_test))
                        flipped.append(float((sc.y[idx] != sc.y_clean[idx]).mean()))
                        distinct.append(len(np.unique(sc.group[idx])) / len(idx))
                    rows[label] = tuple(float(np.mean(v)) for v in (accs, flipped, distinct))
                base = rows["random"][0]
                for label, (acc, flip, dist) in rows.items():
                    print(f"{name} {keep} {label}: {acc:.3f} ({acc - base:+.3f} vs random), "
                          f"flipped {flip:.1%}, distinct {dist:.1%}", flush=True)  # fmt: skip
                found[f"{name} {keep}"] = rows
    out = Path(__file__).parent / "results" / "quality-sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["python", *sys.argv]),
        "seeds": args.seeds,
        "columns": ["accuracy", "flipped_share", "distinct_share"],
        "cells": found,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    return found


if __name__ == "__main__":
    main(sys.argv[1:])
