"""Issue 5.3, quality at one N: train a fresh model on each method's kept set, test it.

Where it sits: `peers.py` saves each method's kept positions (and CRAIG's / GradMatch's
weights) at `quality_n`; this module trains the same MLP with the same recipe on each kept
set, plus the full noisy set and a seeded random subset of the same size and class mix, and
tests on clean held-out data. It also reports how many flipped labels each method kept (the
data has 20% flipped) and how far SAGE's kept set is from the exact-SVD one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from data import BlobSpec, accuracy, blob_arrays, blob_mlp, test_arrays, train

from sage_stream.select.reference import select

TEST_SIZE = 5000


def random_subset(y: np.ndarray, keep: float, seed: int = 0) -> np.ndarray:
    """A seeded random kept set with SAGE's proportional class quotas."""
    n = len(y)
    table = pa.table(
        {
            "__key__": [f"{i:09d}" for i in range(n)],
            "__shard__": ["all"] * n,
            "label": y,
            "status": ["ok"] * n,
            "score": np.zeros(n),
            "loss": np.zeros(n),
            "grad_norm": np.zeros(n),
        }
    )
    chosen = select(table, keep=keep, scorer="random", seed=seed)
    return np.array([int(k) for k in chosen["__key__"].to_pylist()], dtype=np.int64)


def _subsets(kept: dict[str, Path], noisy: np.ndarray, keep: float) -> dict[str, tuple]:
    found: dict[str, tuple] = {
        "full data": (np.arange(len(noisy)), None),
        "random": (random_subset(noisy, keep), None),
    }
    for method, path in kept.items():
        with np.load(path) as saved:
            idx, weights = saved["idx"], saved["weights"]
        uniform = np.allclose(weights, weights[0]) if len(weights) else True
        found[method] = (idx, None if uniform else weights)
    return found


def _evaluate(spec: BlobSpec, data: tuple, idx: np.ndarray, weights, s: dict) -> dict[str, Any]:  # noqa: ANN001
    x, true, noisy, xt, yt = data
    accs = []
    for seed in range(s["seeds"]):
        model = train(blob_mlp(spec), x[idx], noisy[idx], epochs=s["epochs"], seed=seed,
                      weights=weights)  # fmt: skip
        accs.append(accuracy(model, xt, yt))
    return {
        "kept": int(len(idx)),
        "distinct": int(len(np.unique(idx))),
        "weighted": weights is not None,
        "test_accuracy_mean": round(float(np.mean(accs)), 4),
        "test_accuracy_runs": [round(a, 4) for a in accs],
        "flipped_share_kept": round(float(np.mean(noisy[idx] != true[idx])), 4),
    }


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    a, b = set(a.tolist()), set(b.tolist())
    return round(len(a & b) / max(1, len(a | b)), 4)


def subset_quality(
    spec: BlobSpec, s: dict[str, Any], kept: dict[str, Path], keep: float
) -> dict[str, Any]:
    """Test accuracy of a model trained on each kept set at N = s["quality_n"]."""
    x, true, noisy = blob_arrays(spec, s["quality_n"], s["per_shard"])
    xt, yt = test_arrays(spec, TEST_SIZE)
    data = (x, true, noisy, xt, yt)
    subsets = _subsets(kept, noisy, keep)
    results = {name: _evaluate(spec, data, idx, w, s) for name, (idx, w) in subsets.items()}
    for name, row in results.items():
        print(f"quality {name}: {row}")
    body: dict[str, Any] = {
        "n": s["quality_n"],
        "test_size": TEST_SIZE,
        "flipped_share_all": round(float(np.mean(noisy != true)), 4),
        "recipe": {"epochs": s["epochs"], "seeds": s["seeds"], "optimizer": "Adam 3e-3, batch 128"},
        "methods": results,
    }
    if "sage" in subsets and "hand_svd" in subsets:
        body["jaccard_sage_vs_exact_svd"] = jaccard(subsets["sage"][0], subsets["hand_svd"][0])
    return body
