"""Agreement scores against a slow numpy reference; every failure reason; ridge leverage (the
`coverage` column) against a direct inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sage_stream import scores
from sage_stream.fd import FrequentDirections
from sage_stream.progress import Progress


def test_consensus_and_agreement_match_numpy():
    rng = np.random.default_rng(0)
    sigma = np.array([3.0, 2.0, 0.5])
    basis = np.linalg.qr(rng.normal(size=(7, 3)))[0].T  # (ℓ, D) orthonormal rows
    sums, g = rng.normal(size=(2, 7)), rng.normal(size=(5, 7))
    labels = np.array([0, 1, 1, 0, 1])
    mu = torch.from_numpy(sums @ basis.T * sigma)
    mu = (mu / mu.norm(dim=1, keepdim=True)).numpy()
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    got_mu = scores.consensus_directions(t(sigma), t(basis), t(sums)).numpy()
    np.testing.assert_allclose(got_mu, mu, rtol=1e-6)
    z, energy = scores.sketch_coordinates(t(g), t(sigma), t(basis))
    s = scores.agreement(z, t(labels), t(mu)).numpy()
    zn = g @ basis.T * sigma
    expected = np.einsum("ij,ij->i", zn / np.linalg.norm(zn, axis=1, keepdims=True), mu[labels])
    np.testing.assert_allclose(s, expected, rtol=1e-9)
    rho = np.sum((g @ basis.T) ** 2, axis=1) / np.sum(g**2, axis=1)
    np.testing.assert_allclose(energy.numpy(), rho, rtol=1e-9)
    assert np.all((rho >= 0) & (rho <= 1))


def test_every_failure_gets_its_reason_and_no_score():
    basis = torch.eye(3, 4)  # the sketch spans the first 3 coordinates
    sigma = torch.tensor([2.0, 1.0, 1.0])
    consensus = torch.tensor([[1.0, 0, 0], [0, 0, 0]])  # class 1 has no consensus
    grads = torch.tensor(
        [
            [1.0, 0, 0, 0],
            [1.0, 0, 0, 0],
            [float("nan"), 0, 0, 0],
            [0.0, 0, 0, 0],
            [0.0, 0, 0, 5.0],
            [1.0, 1, 0, 0],
        ]  # fmt: skip
    )
    loss = torch.tensor([0.5, float("inf"), 0.5, 0.5, 0.5, 0.5])
    labels = torch.tensor([0, 0, 0, 0, 0, 1])
    out = scores.score_batch(
        grads, loss, labels, scores.SketchTensors(sigma, basis, consensus, 1.0)
    )
    assert out.reasons == [
        None, scores.NONFINITE_LOSS, scores.NONFINITE_GRAD, scores.ZERO_GRAD,
        scores.ORTHOGONAL, scores.NO_CONSENSUS,
    ]  # fmt: skip
    assert out.score[0] == 1.0 and torch.isnan(out.score[1:]).all()
    assert out.energy[4] == 0.0 and torch.isnan(out.energy[2:4]).all()
    assert out.coverage[0] == 1.0 / (4.0 + 1.0) and torch.isnan(out.coverage[1:]).all()


def test_without_a_sketch_only_loss_and_norm_are_measured():
    grads, loss = torch.tensor([[3.0, 4.0]]), torch.tensor([0.1])
    out = scores.score_batch(grads, loss, torch.tensor([0]), None)
    assert out.grad_norm.item() == 5.0 and torch.isnan(out.score).all() and out.reasons == [None]


def test_extra_columns_come_back_exactly_with_and_without_a_sketch():
    grads, loss, labels = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([0.1, 0.2]), \
        torch.tensor([0, 0])  # fmt: skip
    extra = torch.tensor([[0.5, 1.0 / 3.0, -2.0], [float("nan"), 7.0, 1e-30]], dtype=torch.float32)
    sketch = scores.SketchTensors(torch.ones(1), torch.tensor([[1.0, 0.0]]), torch.ones(1, 1), 1.0)
    for tensors in (None, sketch):
        out = scores.score_batch(grads, loss, labels, tensors, extra=extra)
        assert out.extra.dtype == torch.float64 and out.extra.shape == (2, 3)
        torch.testing.assert_close(out.extra.float(), extra, equal_nan=True, rtol=0, atol=0)
        assert scores.score_batch(grads, loss, labels, tensors).extra is None


def test_progress_logs_plain_lines_off_a_terminal(caplog):
    caplog.set_level("INFO", logger="sage_stream")
    progress = Progress("pass 1 (sketch)", total_shards=2, enabled=False)
    progress.advance(10)
    progress.shard_done("a.tar")
    assert progress.close() >= 0
    assert "pass 1 (sketch): 1/2 shards, 10 samples" in caplog.text and "(a.tar)" in caplog.text


def test_an_outlier_gradient_is_an_error_and_never_sketched():
    """Issue 15, case 7: ‖g‖ > 1e15 (inputs of 1e30) is an error row, not an ok row with no score."""
    from sage_stream.scores import GRAD_OUTLIER, MAX_GRAD_NORM, SketchTensors, score_batch, usable

    torch.manual_seed(0)
    grads = torch.randn(4, 6)
    grads[1] *= 1e17  # finite in float32, norm far over the limit
    grads[2, 0] = float("inf")
    loss = torch.tensor([0.5, 0.5, 0.5, float("nan")])
    assert usable(loss, grads).tolist() == [True, False, False, False]
    basis = torch.linalg.qr(torch.randn(6, 3))[0].T.contiguous()  # (3, 6) orthonormal rows
    sigma, consensus = torch.ones(3), torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    sketch = SketchTensors(sigma, basis, consensus, 1.0)
    scored = score_batch(grads, loss, torch.tensor([0, 1, 0, 1]), sketch)
    assert scored.reasons[1] == GRAD_OUTLIER and f"{MAX_GRAD_NORM:.0e}" in GRAD_OUTLIER
    assert scored.reasons[0] is None and torch.isfinite(scored.score[0])
    assert torch.isnan(scored.score[1:]).all() and None not in scored.reasons[1:]
    assert torch.isfinite(scored.coverage[0]) and torch.isnan(scored.coverage[1:]).all()


def test_a_non_finite_score_is_an_error(monkeypatch):
    from sage_stream import scores

    monkeypatch.setattr(scores, "agreement", lambda z, labels, c: torch.tensor([0.5, float("nan")]))
    grads, basis = torch.ones(2, 3), torch.eye(3)
    scored = scores.score_batch(grads, torch.zeros(2), torch.tensor([0, 0]),
                                scores.SketchTensors(torch.ones(3), basis,
                                                     torch.ones(1, 3) / 3**0.5, 1.0))  # fmt: skip
    assert scored.reasons == [None, scores.NONFINITE_SCORE]


def _direct(g: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
    """τ_i = g_iᵀ (BᵀB + λI)⁻¹ g_i with an explicit D×D inverse."""
    inv = np.linalg.inv(b.T @ b + lam * np.eye(b.shape[1]))
    return np.einsum("id,de,ie->i", g, inv, g)


def test_leverage_matches_the_direct_inverse_for_a_partial_basis():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(9, 4)))[0].T  # (ℓ=4, D=9) orthonormal rows
    sigma = np.array([5.0, 3.0, 1.0, 0.2])
    g = rng.normal(size=(6, 9))
    got = scores.ridge_leverage(*(torch.from_numpy(a) for a in (g, sigma, basis)), 0.7)
    np.testing.assert_allclose(got.numpy(), _direct(g, sigma[:, None] * basis, 0.7), rtol=1e-10)


def test_leverage_from_an_fd_sketch_matches_its_own_b_and_bounds_the_exact_one():
    # The same τ as the direct computation on the sketch's B; with λ = λ0 + Δ, BᵀB + λI ≽
    # AᵀA + λ0·I, so each sketched τ is at most the exact leverage with ridge λ0.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 12)) * np.linspace(3, 0.1, 12)  # (N, D), decaying spectrum
    fd = FrequentDirections(dim=12, ell=5)
    fd.update(torch.from_numpy(a).float())
    sigma, basis = fd.finalize()
    lam = scores.ridge_lambda(fd.frobenius_sq, fd.n_rows, fd.delta)
    lam0 = fd.frobenius_sq / fd.n_rows
    assert lam == pytest.approx(lam0 + fd.delta)
    got = scores.ridge_leverage(torch.from_numpy(a), sigma, basis, lam).numpy()
    b = sigma.double().numpy()[:, None] * basis.double().numpy()
    np.testing.assert_allclose(got, _direct(a, b, lam), rtol=1e-5)
    exact = _direct(a, a, lam0)
    assert np.all(got <= exact * (1 + 1e-5))
    assert got.sum() <= exact.sum() and got.min() > 0


def test_copies_share_the_leverage_of_one():
    # Ten copies of a row in an exact sketch have a tenth-ish of a lone row's leverage.
    rng = np.random.default_rng(2)
    lone, copy = rng.normal(size=(1, 6)), rng.normal(size=(1, 6))
    rest = rng.normal(size=(40, 6))
    a = np.vstack([lone, np.repeat(copy, 10, axis=0), rest])
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    tau = scores.ridge_leverage(torch.from_numpy(a), torch.from_numpy(s), torch.from_numpy(vt), 1.0)
    assert tau[1] < tau[0] / 3
