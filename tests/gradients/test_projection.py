"""The seeded projection: deterministic, exactly ±1/√k, block-independent, distance-preserving."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sage_stream.errors import InputError
from sage_stream.gradients import projection
from sage_stream.gradients.projection import Projector, projection_matrix, sign_block

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _sign_int(seed: int, row: int, col: int) -> int:
    """The documented formula in Python integers: a reference independent of numpy."""
    row_key = _mix_int((_mix_int(seed) + (row + 1) * GOLDEN) & M64)
    return -1 if _mix_int((row_key + (col + 1) * GOLDEN) & M64) >> 63 else 1


def test_deterministic_across_calls():
    assert torch.equal(projection_matrix(300, 17, 7), projection_matrix(300, 17, 7))


def test_entries_are_exactly_plus_minus_inv_sqrt_k():
    k = 10
    p = projection_matrix(200, k, 3)
    assert p.shape == (200, k) and p.dtype == torch.float32
    scale = torch.tensor(1 / math.sqrt(k), dtype=torch.float32)
    assert torch.all((p == scale) | (p == -scale))
    p64 = projection_matrix(20, k, 3, dtype=torch.float64)
    assert torch.equal(p64.abs(), torch.full_like(p64, 1 / math.sqrt(k)))
    assert torch.equal(p64.sign(), p[:20].sign().double())


def test_signs_roughly_balanced():
    p = projection_matrix(1000, 100, 0)
    assert abs((p > 0).double().mean().item() - 0.5) < 0.01  # 1e5 entries: sd 0.0016


def test_different_seeds_differ():
    a, b = projection_matrix(100, 50, 0), projection_matrix(100, 50, 1)
    agree = (a == b).double().mean().item()
    assert 0.45 < agree < 0.55  # independent signs agree half the time


def test_matches_integer_reference_and_pinned_pattern():
    got = sign_block(0, 0, 5, 3)
    want = [[_sign_int(0, r, c) for c in range(3)] for r in range(5)]
    assert got.tolist() == want
    # Pinned: a change of the generator would silently put old and new sketches in different
    # spaces, so it must fail this test.
    assert want == [[-1, -1, 1], [1, 1, -1], [-1, -1, -1], [1, -1, -1], [1, -1, -1]]
    big = 2**64 - 1
    assert sign_block(big, 1000, 1002, 4).tolist() == [
        [_sign_int(big, r, c) for c in range(4)] for r in (1000, 1001)
    ]


def test_block_boundaries_do_not_change_the_matrix(monkeypatch):
    dim, k, seed = 23, 3, 5
    whole = projection_matrix(dim, k, seed)
    monkeypatch.setattr(projection, "_BLOCK_ELEMS", 12)  # blocks of 4 rows: 6 blocks, last short
    blocked = projection_matrix(dim, k, seed)
    rowwise = np.concatenate([sign_block(seed, r, r + 1, k) for r in range(dim)])
    assert torch.equal(whole, blocked)
    assert torch.equal(blocked.sign(), torch.from_numpy(rowwise).float())


def test_entries_do_not_depend_on_dim():
    assert torch.equal(projection_matrix(40, 8, 2)[:10], projection_matrix(10, 8, 2))


def test_distances_approximately_preserved():
    torch.manual_seed(0)
    x = torch.randn(20, 2000)
    y = Projector(2000, 1024, seed=0)(x)  # (20, 1024)
    ratio = torch.pdist(y) / torch.pdist(x)
    assert y.shape == (20, 1024)
    assert ratio.min() > 0.85 and ratio.max() < 1.15  # JL: sd of the ratio ≈ 1/√(2k) ≈ 0.02


def test_projector_is_the_matrix_product():
    g = torch.randn(4, 30, dtype=torch.float64)
    proj = Projector(30, 6, seed=9)
    out = proj(g)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, g.float() @ projection_matrix(30, 6, 9))


def test_projector_passes_non_finite_values_through():
    g = torch.zeros(2, 5)
    g[1, 0] = float("nan")
    out = Projector(5, 3, seed=0)(g)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


@pytest.mark.parametrize(
    ("dim", "k", "seed"), [(0, 3, 0), (5, 0, 0), (5, 3, -1), (5, 3, 2**64), (5.0, 3, 0)]
)
def test_bad_arguments_raise_input_error(dim, k, seed):
    with pytest.raises(InputError):
        projection_matrix(dim, k, seed)


def test_projector_rejects_wrong_width():
    with pytest.raises(InputError, match=r"\(B, 5\)"):
        Projector(5, 3, seed=0)(torch.zeros(2, 6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_identical_on_gpu():
    cpu = projection_matrix(5000, 64, 11)
    gpu = projection_matrix(5000, 64, 11, device="cuda")
    assert torch.equal(cpu, gpu.cpu())
