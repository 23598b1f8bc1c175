"""Synthetic data and models for the benchmarks: nothing is downloaded, everything is seeded.

Where it sits: every benchmark script starts here. `write_blob_shards` makes WebDataset tar
shards (`<key>.npy` float32 vector + `<key>.cls` label) of Gaussian class blobs with a share of
labels flipped, so that selection has something real to find; `blob_mlp` is the proxy model
whose last layer gives the gradient features (D = C·(H+1)). Shards are generated shard by
shard from (seed, shard index), so 16N samples never sit in memory at once and N samples are
the first N of 4N.

Images for the GPU benchmark (issue 7) are in `gpu.py`, which owns its CNN.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sage_stream.formats.tar import TarShardWriter


@dataclass(frozen=True)
class BlobSpec:
    """Shape of the synthetic task: C classes of Gaussian blobs in `dim` dimensions."""

    classes: int = 10
    dim: int = 32
    hidden: int = 256
    flip: float = 0.2  # share of labels moved to another class
    spread: float = 0.6  # blob centre scale: clean-label accuracy ~92%, noisy ~81%
    seed: int = 0

    @property
    def grad_dim(self) -> int:
        """D of last-layer gradient features: C·(H+1)."""
        return self.classes * (self.hidden + 1)


def centers(spec: BlobSpec) -> np.ndarray:
    """(C, dim) blob centres, fixed by the spec's seed."""
    return np.random.default_rng([spec.seed, 7]).normal(0, spec.spread, (spec.classes, spec.dim))


def blob_chunk(spec: BlobSpec, chunk: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunk `chunk` of n samples: x (n, dim) float32, true labels, noisy labels (n,) int64."""
    rng = np.random.default_rng([spec.seed, 11, chunk])
    y = rng.integers(0, spec.classes, n)
    x = (centers(spec)[y] + rng.normal(0, 1, (n, spec.dim))).astype(np.float32)
    noisy = y.copy()
    flipped = rng.random(n) < spec.flip
    noisy[flipped] = (y[flipped] + rng.integers(1, spec.classes, int(flipped.sum()))) % spec.classes
    return x, y.astype(np.int64), noisy.astype(np.int64)


def blob_arrays(spec: BlobSpec, n: int, per_shard: int) -> tuple[np.ndarray, ...]:
    """The first n samples exactly as `write_blob_shards` writes them: x, true y, noisy y."""
    parts = [
        blob_chunk(spec, s, min(per_shard, n - s * per_shard)) for s in range(_count(n, per_shard))
    ]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def test_arrays(spec: BlobSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A held-out set with clean labels (chunk ids far from any training shard)."""
    x, y, _ = blob_chunk(spec, 10**9, n)
    return x, y


def _count(n: int, per_shard: int) -> int:
    return -(-n // per_shard)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_blob_shards(folder: Path, spec: BlobSpec, n: int, per_shard: int) -> list[str]:
    """Tar shards `shard-000000.tar`, ... holding n samples; returns their paths in order.

    An existing complete shard (same size as a fresh one would have) is reused, so that the
    N, 4N and 16N runs of one benchmark share their first shards.
    """
    folder = folder / spec_tag(spec)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(_count(n, per_shard)):
        size = min(per_shard, n - s * per_shard)
        path = folder / f"shard-{s:06d}-{size}.tar"
        if not path.exists():
            x, _, noisy = blob_chunk(spec, s, size)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f, TarShardWriter(f) as writer:
                for i in range(size):
                    writer.write(
                        f"s{s:06d}_{i:06d}",
                        {"npy": npy_bytes(x[i]), "cls": str(int(noisy[i])).encode()},
                    )
            tmp.rename(path)
        paths.append(str(path))
    return paths


class BlobMLP(nn.Module):
    """dim -> H -> C. `forward(x, last=True)` also returns the head's input (for CORDS)."""

    def __init__(self, spec: BlobSpec):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(spec.dim, spec.hidden), nn.ReLU())
        self.fc = nn.Linear(spec.hidden, spec.classes)
        self.hidden = spec.hidden

    def forward(self, x: torch.Tensor, last: bool = False, freeze: bool = False):  # noqa: ANN201
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze):
            h = self.body(x)  # (B, H); CORDS's freeze=True: no graph through the body
        out = self.fc(h)  # (B, C)
        return (out, h) if last else out

    def get_embedding_dim(self) -> int:  # CORDS asks the model for H
        return self.hidden


def blob_mlp(spec: BlobSpec | None = None) -> BlobMLP:
    torch.manual_seed(0)
    return BlobMLP(spec or BlobSpec())


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> nn.Module:
    """Minibatch Adam on (x, y); the same recipe for the proxy and for every subset.

    `weights` (per sample, e.g. CRAIG's or GradMatch's) weight the loss within each batch.
    """
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.ones(len(xt)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(128):
            opt.zero_grad()
            losses = nn.functional.cross_entropy(model(xt[idx]), yt[idx], reduction="none")
            ((losses * w[idx]).sum() / w[idx].sum().clamp_min(1e-12)).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def spec_tag(spec: BlobSpec) -> str:
    """Short hash of the spec: names cached shards and checkpoints, so a changed spec never
    reuses data made for another."""
    return hashlib.sha1(repr(asdict(spec)).encode()).hexdigest()[:8]


def proxy_checkpoint(folder: Path, spec: BlobSpec, *, quick: bool = False) -> str:
    """Train the proxy model for a moment on noisy samples (4,000; 1,000 quick); save it."""
    n = 1000 if quick else 4000
    path = folder / f"proxy-{spec_tag(spec)}-{n}.pt"
    if not path.exists():
        x, _, noisy = blob_arrays(spec, n, 1000)
        model = train(blob_mlp(spec), x, noisy, epochs=3)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return str(path)
