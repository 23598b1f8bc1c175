"""Frequent Directions against the slow reference: numpy float64 SVD / Gram matrix of A."""

from __future__ import annotations

import copy
import io
import multiprocessing
import os
import pickle

import numpy as np
import pytest
import torch

from sage_stream import fd_host
from sage_stream.errors import InputError
from sage_stream.fd import FrequentDirections


def gaussian(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def low_rank_noise(n: int, d: int, seed: int, rank: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) * 5.0
    return (signal + 0.1 * rng.standard_normal((n, d))).astype(np.float32)


def student_t(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_t(1.5, size=(n, d)).astype(np.float32)


def power_law_rows(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    norms = rng.pareto(1.2, size=(n, 1)) + 1.0
    return (rng.standard_normal((n, d)) * norms).astype(np.float32)


def low_rank(n: int, d: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))).astype(np.float32)


MATRICES = [gaussian, low_rank_noise, student_t, power_law_rows]


def gram_rounding(a: np.ndarray) -> float:
    """How well float32 Gram products know the eigenvalues FD shrinks by: ε₃₂·√D·‖A‖²_F.

    Each Gram entry is a float32 dot product of D terms (error ~ √D·ε₃₂·|b_i||b_j|), so each
    shrink knows its σ² to ~√D·ε₃₂ times its buffer's energy; summed over the shrinks this
    stays below ε₃₂·√D·‖A‖²_F (measured: at most 0.04 of it on the matrices here). The float64
    reference knows them ~10⁹× better; Δ of the two agree to this much, and a rank-deficient
    buffer's σ_ℓ², exactly 0, comes out at most this large.
    """
    return float(np.finfo(np.float32).eps * np.sqrt(a.shape[1]) * np.sum(a.astype(np.float64) ** 2))


def sketch_of(a: np.ndarray, ell: int, batch: int | None = None) -> FrequentDirections:
    fd = FrequentDirections(ell, a.shape[1])
    batch = batch or len(a)
    for start in range(0, len(a), batch):
        fd.update(torch.from_numpy(a[start : start + batch]))
    return fd


def sketch_matrix(fd: FrequentDirections) -> np.ndarray:
    sigma, basis = fd.finalize()
    return sigma.double().cpu().numpy()[:, None] * basis.double().cpu().numpy()  # (ℓ, D)


def check_fd_bound(a: np.ndarray, fd: FrequentDirections) -> None:
    """‖AᵀA − BᵀB‖₂ ≤ Δ ≤ ‖A − A_k‖²_F / (ℓ − k) for every k < ℓ."""
    b = sketch_matrix(fd)
    a64 = a.astype(np.float64)
    frob = float(np.sum(a64**2))
    tiny = 4 * np.finfo(np.float32).eps * frob  # B is stored in float32 after each shrink
    err = np.linalg.norm(a64.T @ a64 - b.T @ b, 2)
    assert err <= fd.delta * (1 + 1e-5) + tiny
    s = np.linalg.svd(a64, compute_uv=False)
    tails = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])  # tails[k] = ‖A − A_k‖²_F
    for k in range(fd.ell):
        assert fd.delta <= tails[min(k, len(s))] / (fd.ell - k) * (1 + 1e-5) + tiny
    assert fd.n_rows == len(a)
    # from the Gram diagonal: float32 row squares (to ~√D·ε₃₂), added up in float64
    assert fd.frobenius_sq == pytest.approx(frob, rel=1e-6)


@pytest.mark.parametrize("make", MATRICES)
@pytest.mark.parametrize(("n", "d", "ell"), [(600, 40, 8), (500, 80, 16), (300, 12, 5)])
def test_fd_bound(make, n, d, ell):
    a = make(n, d, seed=n + d + ell)
    fd = sketch_of(a, ell, batch=37)
    check_fd_bound(a, fd)
    assert fd.delta > 0


def reference_fd(a: np.ndarray, ell: int) -> tuple[np.ndarray, float]:
    """FD as docs/algorithm.md states it: float64, full SVD of the buffer, one row at a time."""

    def shrink(m: np.ndarray) -> tuple[np.ndarray, float]:
        _, s, vt = np.linalg.svd(m, full_matrices=False)
        s2 = s**2  # squared once, so that the ℓ-th row is dropped exactly
        delta = s2[ell - 1] if len(s2) >= ell else 0.0
        s2 = np.maximum(s2 - delta, 0.0)
        return np.sqrt(s2[s2 > 0])[:, None] * vt[s2 > 0], float(delta)

    b, total = np.zeros((0, a.shape[1])), 0.0
    for row in a.astype(np.float64):
        b = np.vstack([b, row])
        if len(b) == 2 * ell:
            b, delta = shrink(b)
            total += delta
    if len(b) > ell:
        b, delta = shrink(b)
        total += delta
    return b, total


@pytest.mark.parametrize("make", MATRICES)
def test_matches_reference_fd(make):
    a = make(400, 40, seed=21)
    fd = sketch_of(a, 8, batch=33)
    ref, ref_delta = reference_fd(a, 8)
    sigma = fd.finalize()[0].double().numpy()  # its final reduction adds to Δ
    assert fd.delta == pytest.approx(ref_delta, rel=1e-5, abs=gram_rounding(a))
    ref_sigma = np.linalg.svd(ref, compute_uv=False)
    np.testing.assert_allclose(sigma[: len(ref_sigma)], ref_sigma, atol=1e-5 * ref_sigma[0])
    b, gram = sketch_matrix(fd), ref.T @ ref
    assert np.linalg.norm(b.T @ b - gram, 2) <= 1e-5 * np.linalg.norm(gram, 2)


# Exact when rank(A) < ℓ: every buffer then has σ_ℓ = 0, so δ = 0 at each shrink. With the σ_ℓ²
# rule rank(A) == ℓ is not exact in general: a full buffer of rank ℓ has σ_ℓ > 0 and loses it.
@pytest.mark.parametrize(("n", "d", "rank", "ell"), [(400, 30, 5, 8), (300, 60, 15, 16)])
def test_exact_when_rank_below_ell(n, d, rank, ell):
    a = low_rank(n, d, rank, seed=rank)
    fd = sketch_of(a, ell, batch=50)
    b, a64 = sketch_matrix(fd), a.astype(np.float64)
    scale = float(np.sum(a64**2))
    np.testing.assert_allclose(b.T @ b, a64.T @ a64, atol=1e-5 * scale)
    assert fd.delta <= gram_rounding(a)  # 0 but for float32 rounding (see gram_rounding)


def test_exact_when_dim_below_ell():
    a = gaussian(200, 5, seed=3)  # rank 5 < ℓ = 8
    fd = sketch_of(a, 8, batch=9)
    b, a64 = sketch_matrix(fd), a.astype(np.float64)
    np.testing.assert_allclose(b.T @ b, a64.T @ a64, atol=1e-5 * np.sum(a64**2))


@pytest.mark.parametrize("n", [1, 5, 8])
def test_exact_without_shrink(n):
    a = gaussian(n, 20, seed=n)
    fd = sketch_of(a, 8)
    b, a64 = sketch_matrix(fd), a.astype(np.float64)
    np.testing.assert_allclose(b.T @ b, a64.T @ a64, rtol=0, atol=1e-5 * np.sum(a64**2))
    assert fd.delta == 0.0


@pytest.mark.parametrize("make", MATRICES)
@pytest.mark.parametrize("parts", [2, 4])
def test_merge_bound_holds_for_union(make, parts):
    a = make(480, 40, seed=11)
    sketches = [sketch_of(chunk, 8, batch=25) for chunk in np.array_split(a, parts)]
    merged = sketches[0]
    for other in sketches[1:]:
        merged.merge(other)
    check_fd_bound(a, merged)


def test_merge_then_continue_streaming():
    a = power_law_rows(400, 30, seed=5)
    fd = sketch_of(a[:100], 8)
    fd.merge(sketch_of(a[100:250], 8))
    fd.update(torch.from_numpy(a[250:]))
    check_fd_bound(a, fd)


def test_batch_size_independent():
    a = student_t(300, 24, seed=7)
    runs = [sketch_of(a, 8, batch) for batch in (1, 7, 64, len(a))]
    outs = [fd.finalize() for fd in runs]
    for fd, (sigma, basis) in zip(runs[1:], outs[1:], strict=True):
        assert torch.equal(sigma, outs[0][0]) and torch.equal(basis, outs[0][1])
        assert fd.delta == runs[0].delta and fd.frobenius_sq == runs[0].frobenius_sq


@pytest.mark.parametrize("n", [3, 300])
def test_basis_orthonormal_and_zero_rows(n):
    fd = sketch_of(gaussian(n, 30, seed=n), 8)
    sigma, basis = fd.finalize()
    assert sigma.shape == (8,) and basis.shape == (8, 30)
    assert sigma.dtype == basis.dtype == torch.float32
    assert torch.all(sigma[:-1] >= sigma[1:])
    live = sigma > 0
    assert int(live.sum()) == min(n, 8 - 1 if n > 8 else n)
    v = basis[live].double()
    torch.testing.assert_close(v @ v.T, torch.eye(len(v), dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.all(basis[~live] == 0)


def test_finalize_idempotent_and_update_after():
    a = gaussian(200, 20, seed=2)
    fd = sketch_of(a[:150], 8)
    first = fd.finalize()
    delta = fd.delta
    second = fd.finalize()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert fd.delta == delta
    fd.update(torch.from_numpy(a[150:]))
    check_fd_bound(a, fd)


def test_empty_and_zero_rows_give_no_nan():
    fd = FrequentDirections(4, 10)
    sigma, basis = fd.finalize()
    assert torch.all(sigma == 0) and torch.all(basis == 0)
    fd.update(torch.zeros(50, 10))
    sigma, basis = fd.finalize()
    assert torch.all(sigma == 0) and torch.all(basis == 0)
    assert fd.delta == 0.0 and fd.frobenius_sq == 0.0 and fd.n_rows == 50


def test_state_dict_round_trip_continues_identically():
    a = low_rank_noise(400, 32, seed=9)
    fd = sketch_of(a[:173], 8, batch=20)
    buffer = io.BytesIO()
    torch.save(fd.state_dict(), buffer)
    buffer.seek(0)
    resumed = FrequentDirections.from_state_dict(torch.load(buffer, weights_only=True))
    for sketch in (fd, resumed):
        sketch.update(torch.from_numpy(a[173:]))
    assert resumed.delta == fd.delta and resumed.frobenius_sq == fd.frobenius_sq
    assert resumed.n_rows == fd.n_rows == len(a)
    (s1, v1), (s2, v2) = fd.finalize(), resumed.finalize()
    assert torch.equal(s1, s2) and torch.equal(v1, v2)


def test_rows_is_a_copy_without_finalizing():
    fd = sketch_of(gaussian(21, 6, seed=1), 4)  # 21 = 8 + 8 + 5: shrunk twice
    rows = fd.rows()
    assert rows.shape[1] == 6 and rows.shape[0] < 8 and fd.delta > 0
    rows.zero_()
    assert fd.rows().abs().sum() > 0


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 7),  # wrong dim
        torch.zeros(8),  # not 2-D
        torch.tensor([[0.0] * 7 + [float("nan")]]),
        torch.tensor([[1.0] * 7 + [float("inf")]]),
        np.full((2, 8), 1e300),  # overflows float32
        torch.tensor([[1.0] * 8, [1e20] + [0.0] * 7]),  # finite, but its square is not
    ],
)
def test_bad_rows_raise_input_error(bad):
    fd = FrequentDirections(4, 8)
    fd.update(torch.ones(2, 8))
    with pytest.raises(InputError, match="sketch rows"):
        fd.update(bad)
    assert fd.n_rows == 2  # a rejected batch changes nothing


@pytest.mark.parametrize(("ell", "dim"), [(0, 5), (-1, 5), (4, 0), (2.5, 5)])
def test_bad_sizes_raise_input_error(ell, dim):
    with pytest.raises(InputError):
        FrequentDirections(ell, dim)


def test_merge_mismatch_raises_input_error():
    with pytest.raises(InputError, match="ell"):
        FrequentDirections(4, 8).merge(FrequentDirections(5, 8))
    with pytest.raises(ValueError):  # InputError is also a ValueError
        FrequentDirections(4, 8).merge(FrequentDirections(4, 9))


def test_bad_state_raises_input_error():
    state = FrequentDirections(4, 8).state_dict()
    with pytest.raises(InputError, match="missing"):
        FrequentDirections.from_state_dict({k: v for k, v in state.items() if k != "delta"})
    with pytest.raises(InputError, match="shape"):
        FrequentDirections.from_state_dict({**state, "rows": torch.zeros(3, 9)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bound_on_cuda():
    a = power_law_rows(500, 40, seed=4)
    fd = FrequentDirections(8, 40, device="cuda")
    fd.update(torch.from_numpy(a))
    check_fd_bound(a, fd)


class Waiting(FrequentDirections):
    """FD that waits for every shrink's eigh before `update` returns."""

    def _drain(self, wait: bool) -> None:
        super()._drain(wait=True)


@pytest.mark.parametrize("batch", [1, 5, 16, 40, 100])
def test_eigh_beside_the_caller_gives_the_bits_of_waiting(batch):
    """update returns while a shrink's eigh runs (rows that come meanwhile wait in a queue);
    the sketch is bit for bit the one of waiting for each eigh, though the caller refills
    the very tensor it passed as soon as update returns."""
    a = torch.from_numpy(low_rank_noise(700, 40, seed=11))
    waited, fd = Waiting(8, 40), FrequentDirections(8, 40)
    sizes = [batch, 3, 2 * batch + 1]  # a call's rows may wait behind an earlier call's
    reused, pending, start = torch.empty(max(sizes), 40), 0, 0
    while start < len(a):
        chunk = a[start : start + sizes[start % 3]]
        start += len(chunk)
        waited.update(chunk.clone())
        reused[: len(chunk)] = chunk
        fd.update(reused[: len(chunk)])
        reused.fill_(1e3)  # the caller reuses its tensor at once
        pending += fd._started is not None
    assert pending > 0  # the eigh did run beside the caller
    assert fd.n_rows == waited.n_rows == len(a)
    assert fd.delta == waited.delta and fd.frobenius_sq == waited.frobenius_sq
    assert torch.equal(fd.rows(), waited.rows())
    (s1, v1), (s2, v2) = fd.finalize(), waited.finalize()
    assert torch.equal(s1, s2) and torch.equal(v1, v2)


def test_merge_beside_the_caller_gives_the_bits_of_waiting():
    """A merge whose rows make the buffer shrink adds up Δ in the same order as waiting."""
    a = torch.from_numpy(power_law_rows(300, 30, seed=12))
    runs = []
    for cls in (Waiting, FrequentDirections):
        fd, other = cls(8, 30), cls(8, 30)
        for start in range(0, 100, 7):  # Δ ≠ 0 on both sides, then a shrink within the merge
            fd.update(a[start : start + 7])
        other.update(a[100:200])
        fd.merge(other)
        merged = fd.delta
        fd.update(a[200:])
        runs.append((merged, fd.delta, fd.frobenius_sq, *fd.finalize()))
    assert runs[0][:3] == runs[1][:3]
    assert torch.equal(runs[0][3], runs[1][3]) and torch.equal(runs[0][4], runs[1][4])


def test_pickle_and_copy_wait_for_a_running_eigh():
    a = torch.from_numpy(gaussian(100, 12, seed=3))
    fd = sketch_of(a.numpy(), 4, batch=10)
    assert fd._started is not None  # the last update left a shrink running
    for copied in (copy.deepcopy(fd), pickle.loads(pickle.dumps(fd))):
        assert copied.delta == fd.delta and torch.equal(copied.rows(), fd.rows())


def test_eigh_where_it_may_not_run_beside_gives_the_same_bits(monkeypatch):
    """Where numpy's BLAS is shared with torch (conda MKL) the eigh runs on the caller."""
    a = low_rank_noise(300, 20, seed=13)
    beside = sketch_of(a, 8, batch=9)
    monkeypatch.setattr(fd_host, "_eigh_beside", lambda: False)
    here = sketch_of(a, 8, batch=9)
    assert here._started is None or here._started[2].done()
    assert here.delta == beside.delta and torch.equal(here.finalize()[1], beside.finalize()[1])


def _sketch_in_child() -> float:
    return sketch_of(gaussian(100, 12, seed=4), 4).delta


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_has_its_own_eigh_thread():
    """The parent's eigh thread does not exist in a forked child (e.g. a loader worker):
    the child's shrinks start a thread of their own instead of waiting forever."""
    parent = sketch_of(gaussian(100, 12, seed=4), 4).delta
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_sketch_in_child).get(timeout=120) == parent
