"""Seeded random ±1/√k projection of gradient features (optional, `--project-dim k`).

Where it sits: decode → batch → gradients → **projection** → FD sketch / scores. It shrinks the
gradient dimension D to k before sketching, approximately preserving distances and angles
(Johnson–Lindenstrauss).

Why a hash and not `torch.randn`: sketches built on different workers, devices and torch
versions are merged into one space, so every worker must get the same matrix bit for bit. CPU
and CUDA generators give different streams for one seed, and generator streams are not promised
across versions. Each entry is instead a pure function of (seed, row, col): a splitmix64 hash in
numpy uint64 arithmetic (which wraps by definition). The sign of entry (r, c) does not depend
on D, k or the order of generation, so the matrix can be built block by block of rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError, positive_int

# Entries per generated block: bounds numpy temporaries to a few × 32 MiB (uint64). At k = 1024
# a block is 4096 rows.
_BLOCK_ELEMS = 1 << 22

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def sign_block(seed: int, row_start: int, row_stop: int, k: int) -> np.ndarray:
    """Signs (±1, int8) of rows [row_start, row_stop) of the projection: (rows, k).

    Entry (r, c) = sign bit of mix(mix(mix(seed) + (r+1)·γ) + (c+1)·γ), γ the golden-ratio
    constant of splitmix64.
    """
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed], dtype=np.uint64))  # (1,)
        rows = np.arange(row_start + 1, row_stop + 1, dtype=np.uint64)
        row_keys = _mix(key + rows * _GOLDEN)  # (rows,)
        cols = np.arange(1, k + 1, dtype=np.uint64) * _GOLDEN  # (k,)
        h = _mix(row_keys[:, None] + cols[None, :])  # (rows, k)
    top = (h >> np.uint64(63)).astype(np.int8)  # 0 or 1
    return 1 - 2 * top


def _check(dim: int, k: int, seed: int) -> None:
    for name, value in (("dim", dim), ("k", k)):
        positive_int(value, f"projection {name}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"projection seed must be an integer in [0, 2**64), got {seed!r}")


def projection_matrix(
    dim: int,
    k: int,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The (dim, k) projection with entries ±1/√k, identical on every device and worker.

    Generated block by block of rows, each block copied to `device` as soon as it is made, so
    host memory never holds more than one block.
    """
    _check(dim, k, seed)
    scale = torch.tensor(1.0 / math.sqrt(k), dtype=dtype)
    out = torch.empty((dim, k), dtype=dtype, device=device)  # (dim, k)
    step = max(1, _BLOCK_ELEMS // k)
    for start in range(0, dim, step):
        stop = min(start + step, dim)
        signs = torch.from_numpy(sign_block(seed, start, stop, k))  # (rows, k) int8
        out[start:stop] = (signs.to(dtype) * scale).to(device)
    return out


class Projector:
    """Applies the seeded projection: g (B, dim) → g P (B, k), in float32.

    The matrix is materialised once, on `device`: it takes dim·k·4 bytes (D = 1M, k = 1024 is
    4 GiB), so choose k, and the gradient parameters, with that in mind.
    """

    def __init__(self, dim: int, k: int, seed: int, device: str | torch.device = "cpu"):
        self.dim, self.k, self.seed = dim, k, seed
        self.matrix = projection_matrix(dim, k, seed, device=device)  # (dim, k) float32

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        if g.ndim != 2 or g.shape[1] != self.dim:
            raise InputError(
                f"projection expects gradients of shape (B, {self.dim}), got {tuple(g.shape)}"
            )
        if self.matrix.device != g.device:
            self.matrix = self.matrix.to(g.device)  # identical values: moved, not regenerated
        return g.to(torch.float32) @ self.matrix  # (B, k)

    def __repr__(self) -> str:
        return f"Projector(dim={self.dim}, k={self.k}, seed={self.seed})"
