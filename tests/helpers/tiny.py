"""Tiny labelled data sets, shard sets and models for end-to-end tests.

The data are Gaussian blobs, one per class, with a share of labels flipped, so that SAGE has
something real to find; the model is a small MLP trained for a moment on the noisy labels.
`--model tiny:mlp` works from tests (pytest puts this folder on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from shardmaker import make_parquet_shard, make_tar_shard, npy_bytes
from torch import nn

DIM, CLASSES = 8, 3


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def fresh_mlp() -> nn.Module:
    """`mlp` as a factory with no trained weights builds it: torch's own random init, unseeded
    (sage-stream seeds it from --seed when there is no --checkpoint)."""
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def blobs(n: int, *, flip: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n, DIM) float32, true labels, noisy labels (a share `flip` moved to another class)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(CLASSES, DIM))
    y = np.arange(n) % CLASSES
    x = (centers[y] + rng.normal(0, 1, size=(n, DIM))).astype(np.float32)
    noisy = y.copy()
    flipped = rng.choice(n, size=int(flip * n), replace=False)
    noisy[flipped] = (y[flipped] + rng.integers(1, CLASSES, size=len(flipped))) % CLASSES
    return x, y, noisy


def key(i: int) -> str:
    return f"k{i:05d}"


def write_tar_set(folder: str | Path, x: np.ndarray, y: np.ndarray, shards: int = 3) -> list[str]:
    urls = []
    for s, idx in enumerate(np.array_split(np.arange(len(x)), shards)):
        samples = {key(i): {"npy": npy_bytes(x[i]), "cls": str(int(y[i])).encode()} for i in idx}
        urls.append(make_tar_shard(f"{folder}/part-{s:03d}.tar", samples))
    return urls


def write_parquet_set(
    folder: str | Path, x: np.ndarray, y: np.ndarray, shards: int = 3
) -> list[str]:
    urls = []
    for s, idx in enumerate(np.array_split(np.arange(len(x)), shards)):
        table = pa.table(
            {
                "__key__": [key(i) for i in idx],
                "features": [x[i].tolist() for i in idx],
                "label": [int(y[i]) for i in idx],
                "note": [f"row {i}" for i in idx],
            }
        )
        urls.append(make_parquet_shard(f"{folder}/part-{s:03d}.parquet", table, row_group_size=16))
    return urls


def train_checkpoint(path: str | Path, x: np.ndarray, y: np.ndarray, steps: int = 150) -> str:
    """Train `mlp()` briefly on (x, y) and save its state dict; returns the path."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    torch.save(model.state_dict(), path)
    return str(path)
