"""Agreement scores (pass 2 of SAGE): pure tensor maths, no I/O.

Given the finished sketch B = diag(σ)Vᵀ (ℓ×D) and the per-class gradient sums of pass 1,
each sample's gradient g is moved into the sketch basis, z = B g (ℓ), and scored by its cosine
with its class's consensus direction μ_y. Everything here is O(B·ℓ + C·ℓ) in memory; the
gradients themselves are never stored.

Coverage (the `coverage` column): next to its agreement, each sample gets its ridge leverage

    τ_i = g_iᵀ (BᵀB + λI)⁻¹ g_i

from the same sketch B = diag(σ)Vᵀ (ℓ×D) and the same gradient g_i (D), in the same memory
bound: with V's rows orthonormal, (BᵀB + λI)⁻¹ = V diag(1/(σ² + λ)) Vᵀ + (I − VᵀV)/λ, so

    τ_i = Σ_j (v_jᵀ g_i)² / (σ_j² + λ)  +  (‖g_i‖² − ‖V g_i‖²) / λ

needs only V g_i (ℓ numbers, already computed for z = B g) and ‖g_i‖². τ is high for a sample
whose gradient points where few others do (a rare direction) and low for one of many near-copies:
m copies of the same gradient share the leverage one of them alone would have. λ is the FD
shrinkage Δ (so that BᵀB + ΔI ≽ AᵀA ≽ BᵀB: the sketch's error is absorbed in the ridge) plus
the mean squared gradient norm ‖A‖²_F / N (a ridge at the scale of one sample, so that no single
sample's leverage is near 1 only because the sketch has spare rank). Selection ranks by it in
select/coverage.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

# Reasons a sample gets no score. They are recorded in scores/ under status "error".
NONFINITE_LOSS = "non-finite loss"
NONFINITE_GRAD = "non-finite gradient"
ZERO_GRAD = "zero gradient"
ORTHOGONAL = "gradient orthogonal to the sketch (z = 0)"
NO_CONSENSUS = "class has no consensus direction (no usable samples in pass 1)"
NONFINITE_SCORE = "non-finite score"
# A gradient norm above this is an outlier, not a sample: ‖g‖² overflows float32 (3.4e38)
# past ~1.8e19, and a single such row would own the sketch (FD keeps the largest directions).
MAX_GRAD_NORM = 1e15
GRAD_OUTLIER = f"gradient norm over {MAX_GRAD_NORM:.0e} (an outlier input?)"


def ridge_lambda(frobenius_sq: float, n: int, delta: float) -> float:
    """λ = ‖A‖²_F / N + Δ from the sketch's stats; 0 when there were no rows."""
    return float(frobenius_sq) / n + float(delta) if n else 0.0


def ridge_leverage(grads: Tensor, sigma: Tensor, basis: Tensor, lam: float) -> Tensor:
    """τ_i = g_iᵀ(BᵀB + λI)⁻¹g_i with B = diag(σ)V, V (ℓ, D) orthonormal rows.

    grads (B, D), sigma (ℓ,), basis (ℓ, D), λ > 0 -> (B,) float64 (NaN if λ ≤ 0).
    """
    if not lam > 0:
        return torch.full((grads.shape[0],), float("nan"), dtype=torch.float64)
    g = grads.to(torch.float64)
    vg = g @ basis.to(torch.float64).T  # (B, ℓ)
    in_span = (vg**2 / (sigma.to(torch.float64) ** 2 + lam)).sum(dim=1)  # (B,)
    rest = ((g**2).sum(dim=1) - (vg**2).sum(dim=1)).clamp_min(0.0)  # ‖(I − VᵀV) g‖²
    return in_span + rest / lam


def grad_norms(grads: Tensor) -> Tensor:
    """‖g_i‖ (B,) float64, from one float32 pass over the rows (no D-wide float64 copy).

    NaN or inf where a row holds NaN or inf, and inf where ‖g‖ overflows float32 (~1.8e19,
    far above MAX_GRAD_NORM): so `norm <= MAX_GRAD_NORM` is the whole check of a row.
    """
    return torch.linalg.vector_norm(grads, dim=1).to(torch.float64)


def usable(loss: Tensor, grads: Tensor, norms: Tensor | None = None) -> Tensor:
    """(B,) bool: finite loss, finite gradient of norm at most MAX_GRAD_NORM. Only these
    samples enter the sketch in pass 1 and get a score in pass 2. On the rows' device, with
    no host synchronisation."""
    norms = grad_norms(grads) if norms is None else norms
    return torch.isfinite(loss) & (norms <= MAX_GRAD_NORM)  # NaN <= x is False


def consensus_directions(sigma: Tensor, basis: Tensor, class_sums: Tensor) -> Tensor:
    """μ_c = normalize(B S_c) for every class; a zero row where B S_c is zero.

    sigma (ℓ,), basis V (ℓ, D), class_sums S (C, D) -> (C, ℓ) float32.
    """
    sums = class_sums.to(torch.float64)
    projected = (sums @ basis.to(torch.float64).T) * sigma.to(torch.float64)  # (C, ℓ) = (B S_c)ᵀ
    norms = projected.norm(dim=1, keepdim=True)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return (projected / safe).to(torch.float32)


def sketch_coordinates(grads: Tensor, sigma: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """z = B g and the energy captured ρ = ‖V g‖² / ‖g‖².

    grads (B, D), sigma (ℓ,), basis (ℓ, D) -> z (B, ℓ), energy (B,); energy is NaN where g = 0.
    """
    vg = grads @ basis.T  # (B, ℓ)
    return vg * sigma, energy_of(vg, grad_norms(grads))


def energy_of(vg: Tensor, norms: Tensor) -> Tensor:
    """ρ = ‖V g‖² / ‖g‖² from V g (B, ℓ) and ‖g‖ (B,): (B,) float64, NaN where g = 0."""
    return (vg.to(torch.float64) ** 2).sum(dim=1) / norms**2


def agreement(z: Tensor, labels: Tensor, consensus: Tensor) -> Tensor:
    """s_i = ⟨z_i/‖z_i‖, μ_{y_i}⟩ ∈ [−1, 1]; NaN where z_i = 0.

    z (B, ℓ), labels (B,) int64 in [0, C), consensus (C, ℓ) -> (B,) float64.
    """
    z64 = z.to(torch.float64)
    unit = z64 / z64.norm(dim=1, keepdim=True)
    return (unit * consensus.to(torch.float64)[labels]).sum(dim=1)


def ridge_from_projection(vg: Tensor, norms: Tensor, sigma: Tensor, lam: float) -> Tensor:
    """The ridge leverage τ_i = g_iᵀ(BᵀB + λI)⁻¹g_i of `ridge_leverage`, from V g_i
    (B, ℓ) and ‖g_i‖ (B,), which pass 2 has anyway: O(B·ℓ) work instead of a float64 copy of
    g and a float64 product. (B,) float64."""
    if not lam > 0:
        return torch.full((vg.shape[0],), float("nan"), dtype=torch.float64, device=vg.device)
    vg64 = vg.to(torch.float64)
    captured = (vg64**2).sum(dim=1)  # ‖V g‖², (B,)
    in_span = (vg64**2 / (sigma.to(torch.float64) ** 2 + lam)).sum(dim=1)
    rest = (norms.to(torch.float64) ** 2 - captured).clamp_min(0.0)  # ‖(I − VᵀV) g‖²
    return in_span + rest / lam


class SketchTensors(NamedTuple):
    """What pass 2 scores against, on the scoring device."""

    sigma: Tensor  # (ℓ,)
    basis: Tensor  # (ℓ, D) V, orthonormal rows
    consensus: Tensor  # (C, ℓ) μ_c
    ridge: float  # λ of the ridge leverage (ridge_lambda)


@dataclass
class ScoredBatch:
    """Per-sample results of one batch, as float64 on the CPU; reason is None where ok."""

    score: Tensor  # (B,) NaN where no score
    loss: Tensor  # (B,)
    grad_norm: Tensor  # (B,)
    energy: Tensor  # (B,) NaN where no sketch or no gradient
    coverage: Tensor  # (B,) ridge leverage τ; NaN where no sketch or no score
    z: Tensor | None  # (B, ℓ) float32, kept only when asked (centroid consensus)
    reasons: list[str | None]
    extra: Tensor | None = None  # (B, k) float64: the caller's `extra`, in the same transfer


def failure_reasons(
    loss: Tensor, grad_norm: Tensor, z_norm: Tensor | None, has_consensus: Tensor | None
) -> list[str | None]:
    """Why each sample gets no score, first failing check wins; None where it is fine.
    Host tensors (B,): the caller moves them over once per batch."""
    checks = [(~torch.isfinite(loss), NONFINITE_LOSS), (~torch.isfinite(grad_norm), NONFINITE_GRAD)]
    checks.append((grad_norm > MAX_GRAD_NORM, GRAD_OUTLIER))
    checks.append((grad_norm == 0, ZERO_GRAD))
    if z_norm is not None:
        checks.append((~(z_norm > 0), ORTHOGONAL))
    if has_consensus is not None:
        checks.append((~has_consensus, NO_CONSENSUS))
    reasons: list[str | None] = [None] * loss.shape[0]
    for mask, reason in reversed(checks):  # earlier checks overwrite later ones
        for i in mask.nonzero().flatten().tolist():
            reasons[i] = reason
    return reasons


def _outlier_or_nonfinite(grads: Tensor, norms: Tensor) -> Tensor:
    """‖g‖ (B,) float64 on the host (`norms` moved over already), exact for the rare rows whose
    float32 norm is not finite: a finite row of norm over ~1.8e19 is an outlier, not a
    non-finite gradient."""
    bad = (~torch.isfinite(norms)).nonzero().flatten()
    if bad.numel():  # only on bad input: one more small copy
        norms = norms.clone()
        norms[bad] = grads[bad.to(grads.device)].to(torch.float64).norm(dim=1).cpu()
    return norms


def score_batch(
    grads: Tensor,
    loss: Tensor,
    labels: Tensor,
    sketch: SketchTensors | None,
    *,
    keep_z: bool = False,
    extra: Tensor | None = None,
) -> ScoredBatch:
    """Score one batch against `sketch`, or only measure it if None.

    grads (B, D) and labels (B,) on the sketch's device. With `keep_z` the sketch coordinates
    are returned for centroid consensus, and the score is left NaN (it needs every z first).
    `extra` (B, k), on the same device, comes back as float64 in the same transfer (pass 2's
    margin and near-copy signature).

    One float32 pass over the rows for ‖g‖ and one product V g (B, ℓ) make everything else:
    z, the energy, the agreement and the leverage are (B, ℓ) work. The results come to the
    host in one transfer, where the reasons are decided.
    """
    norms = grad_norms(grads)  # (B,) float64, on the device
    if sketch is None:
        host = _with_extra(torch.stack([loss.double(), norms]), extra).cpu()  # one transfer
        loss_h, norms_h = host[:2]
        grad_norm = _outlier_or_nonfinite(grads, norms_h)
        nan = torch.full_like(grad_norm, float("nan"))
        reasons = failure_reasons(loss_h, grad_norm, None, None)
        return ScoredBatch(nan, loss_h, grad_norm, nan, nan.clone(), None, reasons, _extra(host, 2))
    sigma, basis, consensus, ridge = sketch
    finite = norms <= MAX_GRAD_NORM  # (B,): a NaN row must not leak into z
    vg = torch.where(finite[:, None], grads @ basis.T, 0.0)  # (B, ℓ); a GEMM row is its own
    z = vg * sigma  # (B, ℓ)
    energy = torch.where(finite & (norms > 0), energy_of(vg, norms), torch.nan)
    score = torch.full_like(norms, float("nan")) if keep_z else agreement(z, labels, consensus)
    coverage = ridge_from_projection(vg, torch.where(finite, norms, 0.0), sigma, ridge)
    has_consensus = (consensus.norm(dim=1) > 0)[labels]
    host = _with_extra(torch.stack([
        loss.double(), score, energy, coverage.to(norms.device), z.norm(dim=1).double(),
        has_consensus.double(), norms,
    ]), extra).cpu()  # (7 + k, B): one transfer  # fmt: skip
    loss_h, score_h, energy_h, coverage_h, z_norm, has_h, norms_h = host[:7]
    grad_norm = _outlier_or_nonfinite(grads, norms_h)
    reasons = failure_reasons(loss_h, grad_norm, z_norm, None if keep_z else has_h > 0)
    if not keep_z:  # a finite gradient can still make a NaN or inf score (z overflowing)
        for i in (~torch.isfinite(score_h)).nonzero().flatten().tolist():
            reasons[i] = reasons[i] or NONFINITE_SCORE
    bad = torch.tensor([r is not None for r in reasons], dtype=torch.bool)
    score_h = torch.where(bad, torch.nan, score_h)
    coverage_h = torch.where(bad, torch.nan, coverage_h)
    return ScoredBatch(
        score_h, loss_h, grad_norm, energy_h, coverage_h,
        z.float().cpu() if keep_z else None, reasons, _extra(host, 7),
    )  # fmt: skip


def _with_extra(rows: Tensor, extra: Tensor | None) -> Tensor:
    """(n, B) rows with the caller's (B, k) extra columns below them, as float64."""
    return rows if extra is None else torch.cat([rows, extra.to(rows.device).double().T])


def _extra(host: Tensor, first: int) -> Tensor | None:
    return host[first:].T if host.shape[0] > first else None
