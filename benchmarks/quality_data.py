"""The quality benchmark's four kinds of data, all made from scikit-learn's digits (no download).

Every scenario splits the 1,797 digits the demo's way: the first 1,400 are the source of the
training pool, the last 397 (clean labels, all classes) judge the trained models. What differs
is the pool the stage selects from:

- ``label-noise``: the 1,400 with 20% of the labels moved to another class (the demo's flips).
- ``redundancy``: clean labels; 200 of the 1,400 (seeded) are each replaced by 10 near-copies
  (pixel noise of std 0.01, clipped to [0, 1]): 1,200 distinct + 2,000 near-copies.
- ``long-tail``: clean labels; class c keeps round(n_c · 0.05^(c/9)) of its samples, from about
  140 for class 0 to 7 for class 9 (the test set stays balanced).
- ``small-budget``: the 1,400 with clean labels, kept at 1-10%.

The proxy model that judges the pool is the demo's MLP trained on that pool (its labels as they
are, noisy or not) with the demo's recipe, trained as the demo trains it (`train_reproducible`:
numpy starting weights, float64 steps), so that it does not depend on the machine. Everything
here is fixed: the seeds of the benchmark vary only the trained models and the seeded draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sage_stream.demo import (
    FLIP_SHARE,
    TEST_SIZE,
    flip_labels,
    load_digits_data,
    train_reproducible,
    write_shards,
)

COPIES, COPIED, COPY_NOISE = 10, 200, 0.01
TAIL_RATIO = 0.05  # the smallest class keeps this share of its samples


@dataclass
class Scenario:
    name: str
    title: str
    keeps: tuple[float, ...]
    x: np.ndarray  # (N, 64) float32 pool
    y: np.ndarray  # (N,) int64 labels as the stage sees them (noisy for label-noise)
    y_clean: np.ndarray  # (N,) true labels
    group: np.ndarray  # (N,) int64 id of the original digit (near-copies share one)
    x_test: np.ndarray  # (397, 64)
    y_test: np.ndarray  # (397,)
    urls: list[str] = field(default_factory=list)
    checkpoint: str = ""

    def describe(self) -> dict:
        return {
            "title": self.title,
            "pool": len(self.y),
            "distinct": int(len(np.unique(self.group))),
            "flipped_share": float((self.y != self.y_clean).mean()),
            "class_counts": np.bincount(self.y, minlength=10).tolist(),
            "keeps": list(self.keeps),
        }


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits_data()
    n = len(x) - TEST_SIZE
    return x[:n], y[:n], x[n:], y[n:]


def label_noise(keeps: tuple[float, ...]) -> Scenario:
    x, y, xt, yt = _split()
    noisy = flip_labels(y, FLIP_SHARE, seed=0)
    return Scenario("label-noise", f"{FLIP_SHARE:.0%} of labels flipped", keeps,
                    x, noisy, y, np.arange(len(y)), xt, yt)  # fmt: skip


def redundancy(keeps: tuple[float, ...]) -> Scenario:
    x, y, xt, yt = _split()
    rng = np.random.default_rng(0)
    copied = np.sort(rng.choice(len(y), COPIED, replace=False))
    rest = np.setdiff1d(np.arange(len(y)), copied)
    source = np.concatenate([rest, np.repeat(copied, COPIES)])  # (N,) original index
    noise = rng.normal(0, COPY_NOISE, size=(len(source) - len(rest), x.shape[1]))
    xs = x[source].copy()
    xs[len(rest) :] = np.clip(xs[len(rest) :] + noise, 0, 1)
    share = (len(source) - len(rest)) / len(source)
    title = f"{COPIED} digits x {COPIES} near-copies ({share:.0%} of the pool)"
    return Scenario("redundancy", title, keeps, xs.astype(np.float32), y[source], y[source],
                    source, xt, yt)  # fmt: skip


def long_tail(keeps: tuple[float, ...]) -> Scenario:
    x, y, xt, yt = _split()
    rng = np.random.default_rng(0)
    kept = []
    for c in range(10):
        members = np.flatnonzero(y == c)
        n = int(round(len(members) * TAIL_RATIO ** (c / 9)))
        kept.append(np.sort(rng.choice(members, n, replace=False)))
    idx = np.sort(np.concatenate(kept))
    counts = np.bincount(y[idx], minlength=10)
    title = f"long tail, {counts.max()} to {counts.min()} per class"
    return Scenario("long-tail", title, keeps, x[idx], y[idx], y[idx], idx, xt, yt)


def small_budget(keeps: tuple[float, ...]) -> Scenario:
    x, y, xt, yt = _split()
    return Scenario("small-budget", "clean labels, small budgets", keeps, x, y, y,
                    np.arange(len(y)), xt, yt)  # fmt: skip


BUILDERS = {
    "label-noise": (label_noise, (0.1, 0.3, 0.5)),
    "redundancy": (redundancy, (0.1, 0.3)),
    "long-tail": (long_tail, (0.1, 0.3)),
    "small-budget": (small_budget, (0.01, 0.05, 0.1)),
}


def prepare(name: str, root: Path, keeps: tuple[float, ...] | None = None) -> Scenario:
    """Build a scenario, write its pool as tar shards and train its proxy on the pool."""
    build, default = BUILDERS[name]
    sc = build(keeps or default)
    folder = root / name
    sc.urls = write_shards(folder / "input", sc.x, sc.y)
    sc.checkpoint = str(folder / "proxy.pt")
    proxy = train_reproducible(sc.x, sc.y)  # the same proxy on any machine
    torch.save(proxy.float().state_dict(), sc.checkpoint)
    return sc
