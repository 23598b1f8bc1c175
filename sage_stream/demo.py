"""`sage-stream demo`: the whole stage on real data, locally, in well under a minute on a CPU.

The data is scikit-learn's handwritten digits (1,797 real 8×8 scans that ship inside the
package, so nothing is downloaded). A share of the training labels is flipped, the way real
label noise creeps in; a small proxy model is trained on the noisy set for a few seconds; then
the stage runs exactly as a user would run it (`api.run` on tar shards on disk) and the demo
reports what it kept: the share of flipped labels among the kept samples against the share
among all, and what a model trained on the kept half does on clean held-out digits.

Its figures are the same on every machine (checked: 1 and 2 threads, AVX-512, AVX2 and
baseline x86 kernels, the CPU and CUDA builds of torch), so the README can print them. Three
things make them so, each found by a figure that moved: the demo runs on one thread (a float sum
split over threads is added up in another order); its models start from weights drawn by numpy
(torch's own uniform draws differ between its AVX2 and baseline CPU kernels); and they train in
float64 (300 Adam steps in float32 carry one kernel's last-bit rounding into other kept samples).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from . import api
from .errors import InputError
from .formats.tar import TarShardWriter

NUM_SHARDS = 8
TEST_SIZE = 397  # the last 397 digits, labels untouched, judge the trained models
FLIP_SHARE = 0.2
DEMO_THREADS = 1  # see the module docstring: the same figures for any core count


def digits_mlp() -> nn.Module:
    """The demo's proxy model: 64 pixels -> 128 hidden -> 10 classes (last layer is the head)."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError(
            "the demo's data ships with scikit-learn: pip install 'sage-stream[demo]'"
        ) from None
    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def flip_labels(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Move `share` of the labels to another class, uniformly; returns the noisy copy."""
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flipped = rng.choice(len(labels), size=int(round(share * len(labels))), replace=False)
    noisy[flipped] = (labels[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    return noisy


def write_shards(folder: Path, x: np.ndarray, y: np.ndarray) -> list[str]:
    """Tar shards of `<key>.npy` (float32 pixels) + `<key>.cls` (label), as WebDataset has them."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s, idx in enumerate(np.array_split(np.arange(len(x)), NUM_SHARDS)):
        url = folder / f"digits-{s:03d}.tar"
        with open(url, "wb") as f, TarShardWriter(f) as writer:
            for i in idx:
                buf = io.BytesIO()
                np.save(buf, x[i])
                writer.write(f"{i:05d}", {"npy": buf.getvalue(), "cls": str(y[i]).encode()})
        urls.append(str(url))
    return urls


def train(x: np.ndarray, y: np.ndarray, *, steps: int = 300, seed: int = 0) -> nn.Module:
    """Full-batch Adam on (x, y): a second or two on a CPU."""
    torch.manual_seed(seed)
    return fit_full_batch(digits_mlp(), x, y, steps)


def train_reproducible(
    x: np.ndarray, y: np.ndarray, *, steps: int = 300, seed: int = 0
) -> nn.Module:
    """`train` with the same result on every machine: numpy draws the starting weights (from
    torch's default ranges, U(±1/sqrt(fan_in))) and the steps run in float64."""
    rng = np.random.default_rng(seed)
    model = digits_mlp().double()
    with torch.no_grad():
        for layer in model.children():
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                for param in (layer.weight, layer.bias):
                    param.copy_(torch.from_numpy(rng.uniform(-bound, bound, param.shape)))
    return fit_full_batch(model, x, y, steps)


def fit_full_batch(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int) -> nn.Module:
    """Full-batch Adam on (x, y) for `steps` steps, in the model's dtype; the model in eval mode."""
    dtype = next(model.parameters()).dtype
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x).to(dtype), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    xt = torch.from_numpy(x).to(next(model.parameters()).dtype)
    with torch.no_grad():
        return float((model(xt).argmax(1).numpy() == y).mean())


def _kept_indices(out: Path) -> np.ndarray:
    keys = pq.read_table(out / "selection.parquet", columns=["__key__"])["__key__"].to_pylist()
    return np.array(sorted(int(k) for k in keys), dtype=np.int64)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch and the BLAS/OpenMP pools on `n` threads inside the block; as before after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)


def run_demo(out: str = "sage-demo", keep: float = 0.5, device: str = "auto") -> str:
    with _threads(DEMO_THREADS):
        return _run_demo(out, keep, device)


def _run_demo(out: str, keep: float, device: str) -> str:
    start = time.monotonic()
    root = Path(out)
    x, y = load_digits_data()
    n_train = len(x) - TEST_SIZE
    x_train, y_clean, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    y_noisy = flip_labels(y_clean, FLIP_SHARE, seed=0)
    flipped = y_noisy != y_clean
    urls = write_shards(root / "input", x_train, y_noisy)
    (root / "input" / "flipped.json").write_text(json.dumps(np.flatnonzero(flipped).tolist()))
    proxy = train_reproducible(x_train, y_noisy)
    torch.save(proxy.float().state_dict(), root / "proxy.pt")  # the stage runs in float32
    result = api.run(
        urls,
        model="sage_stream.demo:digits_mlp",
        checkpoint=str(root / "proxy.pt"),
        out=str(root / "run"),
        keep=keep,
        device=device,
    )
    kept = _kept_indices(root / "run")
    rng = np.random.default_rng(1)
    rand = np.sort(rng.choice(n_train, size=len(kept), replace=False))
    acc = {
        "all": accuracy(train_reproducible(x_train, y_noisy), x_test, y_test),
        "kept": accuracy(train_reproducible(x_train[kept], y_noisy[kept]), x_test, y_test),
        "random": accuracy(train_reproducible(x_train[rand], y_noisy[rand]), x_test, y_test),
    }
    t = result.emit.totals
    return "\n".join(
        [
            f"sage-stream demo: {n_train} real handwritten digits in {NUM_SHARDS} tar shards, "
            f"{flipped.mean():.0%} of the labels flipped",
            f"  kept {t['kept']} of {t['scored']} scored ({t['errored']} errors), "
            f"keep fraction {keep}",
            f"  flipped labels among all samples:  {flipped.mean():6.1%}",
            f"  flipped labels among kept samples: {flipped[kept].mean():6.1%}",
            f"  flipped labels among dropped:      {np.delete(flipped, kept).mean():6.1%}",
            f"  test accuracy (clean labels) of a model trained on: all noisy {acc['all']:.3f}"
            f" | SAGE-kept {acc['kept']:.3f} | random subset of the same size {acc['random']:.3f}",
            f"  output: {root / 'run'} (shards/, scores/, selection.parquet, manifest.json)",
            f"  done in {time.monotonic() - start:.1f} s",
        ]
    )
