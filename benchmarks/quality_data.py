"""The quality benchmark's data: two data sets, four scenarios each (nothing is downloaded).

Data sets:

- ``digits``: scikit-learn's handwritten digits (8×8 scans that ship with the package), split
  the demo's way: the first 1,400 are the source of the pool, the last 397 judge the models.
  Model: the demo's MLP (64-128-10).
- ``control``: Synthetic Control Chart time series from the published generator, run locally
  (`quality_signals.py`): 1,200 series (200 per class) are the source of the pool, 600 more
  (100 per class, another seed) judge the models. Model: a small 1-D CNN.

Scenarios, the same for both (C classes, n_c source samples of class c):

- ``label-noise``: the source with 20% of the labels moved to another class, uniformly.
- ``near-copies``: clean labels; `copied` of the source (seeded) are each replaced by `copies`
  near-copies (noise of std `copy_noise` on every value); the rest stay single.
- ``long-tail``: clean labels; class c keeps round(n_c · 0.05^(c/(C−1))) of its samples.
- ``clean``: the source with clean labels.

The proxy model that judges the pool is the data set's model trained on that pool (its labels
as they are, noisy or not), trained reproducibly (numpy starting weights, float64 steps), so it
does not depend on the machine. Everything here is fixed: the benchmark's seeds vary only the
trained models and the seeded draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import quality_signals
import torch

from sage_stream import demo

FLIP_SHARE = demo.FLIP_SHARE
TAIL_RATIO = 0.05  # the smallest class keeps this share of its samples
KEEPS = (0.05, 0.1, 0.3)
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x, y, x_test, y_test


@dataclass(frozen=True)
class DataSet:
    name: str
    unit: str  # what one sample is, for the tables ("digits", "series")
    model: str  # the stage's --model
    load: Callable[[], Split]
    train: Callable[..., torch.nn.Module]
    train_reproducible: Callable[..., torch.nn.Module]
    classes: int
    copied: int  # near-copies: originals that are copied
    copies: int  # near-copies of each
    copy_noise: float


def _digits() -> Split:
    x, y = demo.load_digits_data()
    n = len(x) - demo.TEST_SIZE
    return x[:n], y[:n], x[n:], y[n:]


def _control() -> Split:
    x, y = quality_signals.control_charts(200, seed=0)
    xt, yt = quality_signals.control_charts(100, seed=1)
    return x, y, xt, yt


DATASETS = {
    "digits": DataSet(
        "digits",
        "digits",
        "sage_stream.demo:digits_mlp",
        _digits,
        demo.train,
        demo.train_reproducible,
        10,
        200,
        10,
        0.01,
    ),  # fmt: skip
    "control": DataSet(
        "control",
        "series",
        "quality_signals:control_cnn",
        _control,
        quality_signals.train,
        quality_signals.train_reproducible,
        quality_signals.CLASSES,
        300,
        5,
        0.01,
    ),  # fmt: skip
}


@dataclass
class Scenario:
    data: DataSet
    name: str
    title: str
    keeps: tuple[float, ...]
    x: np.ndarray  # (N, d) float32 pool
    y: np.ndarray  # (N,) int64 labels as the stage sees them (noisy for label-noise)
    y_clean: np.ndarray  # (N,) true labels
    group: np.ndarray  # (N,) int64 id of the original sample (near-copies share one)
    x_test: np.ndarray
    y_test: np.ndarray
    urls: list[str] = field(default_factory=list)
    checkpoint: str = ""

    def describe(self) -> dict:
        return {
            "data": self.data.name,
            "unit": self.data.unit,
            "title": self.title,
            "pool": len(self.y),
            "distinct": int(len(np.unique(self.group))),
            "flipped_share": float((self.y != self.y_clean).mean()),
            "class_counts": np.bincount(self.y, minlength=self.data.classes).tolist(),
            "keeps": list(self.keeps),
        }


def flip(labels: np.ndarray, share: float, classes: int, seed: int) -> np.ndarray:
    """Move `share` of the labels to another class, uniformly (the demo's flips for C = 10)."""
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flipped = rng.choice(len(labels), size=int(round(share * len(labels))), replace=False)
    noisy[flipped] = (labels[flipped] + rng.integers(1, classes, size=len(flipped))) % classes
    return noisy


def label_noise(d: DataSet, keeps: tuple[float, ...]) -> Scenario:
    x, y, xt, yt = d.load()
    noisy = flip(y, FLIP_SHARE, d.classes, seed=0)
    return Scenario(d, "label-noise", f"{FLIP_SHARE:.0%} of labels flipped", keeps,
                    x, noisy, y, np.arange(len(y)), xt, yt)  # fmt: skip


def near_copies(d: DataSet, keeps: tuple[float, ...]) -> Scenario:
    x, y, xt, yt = d.load()
    rng = np.random.default_rng(0)
    copied = np.sort(rng.choice(len(y), d.copied, replace=False))
    rest = np.setdiff1d(np.arange(len(y)), copied)
    source = np.concatenate([rest, np.repeat(copied, d.copies)])  # (N,) original index
    noise = rng.normal(0, d.copy_noise, size=(len(source) - len(rest), x.shape[1]))
    xs = x[source].copy()
    copies = xs[len(rest) :] + noise
    xs[len(rest) :] = (
        np.clip(copies, 0, 1) if d.name == "digits" else copies
    )  # pixels stay in [0, 1]
    share = (len(source) - len(rest)) / len(source)
    title = f"{d.copied} {d.unit} x {d.copies} near-copies ({share:.0%} of the pool)"
    return Scenario(d, "near-copies", title, keeps, xs.astype(np.float32), y[source], y[source],
                    source, xt, yt)  # fmt: skip


def long_tail(d: DataSet, keeps: tuple[float, ...]) -> Scenario:
    x, y, xt, yt = d.load()
    rng = np.random.default_rng(0)
    kept = []
    for c in range(d.classes):
        members = np.flatnonzero(y == c)
        n = int(round(len(members) * TAIL_RATIO ** (c / (d.classes - 1))))
        kept.append(np.sort(rng.choice(members, n, replace=False)))
    idx = np.sort(np.concatenate(kept))
    counts = np.bincount(y[idx], minlength=d.classes)
    title = f"long tail, {counts.max()} to {counts.min()} per class"
    return Scenario(d, "long-tail", title, keeps, x[idx], y[idx], y[idx], idx, xt, yt)


def clean(d: DataSet, keeps: tuple[float, ...]) -> Scenario:
    x, y, xt, yt = d.load()
    return Scenario(d, "clean", "clean labels", keeps, x, y, y, np.arange(len(y)), xt, yt)


BUILDERS = {"label-noise": label_noise, "near-copies": near_copies, "long-tail": long_tail,
            "clean": clean}  # fmt: skip


def prepare(data: str, name: str, root: Path, keeps: tuple[float, ...] = KEEPS) -> Scenario:
    """Build a scenario, write its pool as tar shards and train its proxy on the pool."""
    d = DATASETS[data]
    sc = BUILDERS[name](d, keeps)
    folder = root / data / name
    sc.urls = demo.write_shards(folder / "input", sc.x, sc.y)
    sc.checkpoint = str(folder / "proxy.pt")
    proxy = d.train_reproducible(sc.x, sc.y)  # the same proxy on any machine
    torch.save(proxy.float().state_dict(), sc.checkpoint)
    return sc
