"""Frequent Directions: pass 1 of SAGE, per-sample gradient rows -> sketch B
(docs/algorithm.md, "Pass 1").

Pass 1 streams gradient features g_i ∈ R^D (one row per sample) into this sketch. It keeps at most
2ℓ rows in O(ℓ·D) memory and guarantees ‖AᵀA − BᵀB‖₂ ≤ Δ ≤ ‖A − A_k‖²_F / (ℓ − k) for every
k < ℓ, where A is every row seen. `finalize` gives (σ, V) of B, which the sketch store writes to
`sketch.zarr` and pass 2 uses to score samples. Workers sketch disjoint shards and `merge`.

Pure tensor code, device-agnostic: no storage, no logging. Results are bit-for-bit reproducible
on one device for the same rows in the same order, whatever the batch sizes. A shrink's eigh
runs on a thread of its own while the caller computes the next rows (see the class).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sage_stream.errors import InputError, positive_int
from sage_stream.fd_host import eigh_now, host_svd, start_eigh

_STATE_KEYS = ("ell", "dim", "rows", "n_rows", "frobenius_sq_counted", "uncounted_from", "delta")


def _fix_signs(rows: Tensor) -> Tensor:
    """Flip each row so its largest-|.| entry is positive: singular vectors have no sign."""
    if rows.numel() == 0:
        return rows
    # The largest-|.| entry is the row's max or its min: two reductions, no |rows| copy.
    top, bottom = rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True)  # (m, 1)
    sign = torch.where(-bottom > top, -1.0, 1.0).to(rows.dtype)  # ties keep the + sign
    return rows * sign


def _shrink(rows: Tensor, ell: int, orthogonal: int = 0) -> tuple[Tensor, float, Tensor]:
    """One FD shrink of `rows` (m, D): subtract δ = σ_ℓ² from every σ_j², clamp at 0.

    Returns (B, δ, ‖row‖² (m,) float32) with B = diag(σ')Vᵀ, float32 (k, D), k ≤ ℓ − 1 rows
    with σ' > 0 (δ = 0 and no row dropped when m < ℓ). We go through the Gram matrix: m ≤ 2ℓ ≪
    D, so the m×m eigenproblem is much cheaper than an SVD of the m×D matrix, and its diagonal
    gives the rows' squared norms for ‖A‖²_F at no cost.

    The products are float32 on the rows' device; only the m×m eigenproblem is float64. The
    first `orthogonal` rows are the B of the previous shrink, whose rows are orthogonal, so
    their block of the Gram matrix is diag(‖b_j‖²) and only the new rows' blocks need
    products: (k + n)·n·D multiply-adds instead of m²·D. Float32 rounding makes the
    eigenvalues known to about √D·ε₃₂·λ_max (the tests' tolerances say so). B's rows keep
    the signs eigh gives (BᵀB does not depend on them); `finalize` fixes the basis's signs.
    """
    return _end_shrink(rows, ell, _start_shrink(rows, orthogonal))


# a started shrink: its Gram matrix, the float64 host copy, its eigh, the process that started it
_Started = tuple[Tensor, np.ndarray, "Future[tuple[np.ndarray, np.ndarray]]", int]


def _start_shrink(rows: Tensor, orthogonal: int, beside: bool = False) -> _Started:
    """The Gram matrix of `rows` (m, D), and its eigh: started on the eigh thread if `beside`
    (and fd_host allows it), else done here. Every torch operation stays on the caller's
    thread and stream."""
    gram = _gram(rows, orthogonal)  # (m, m) float32
    host = gram.double().cpu().numpy()
    return gram, host, start_eigh(host, beside), os.getpid()


def _end_shrink(rows: Tensor, ell: int, started: _Started) -> tuple[Tensor, float, Tensor]:
    """`_shrink` once its eigh is done; `rows` must be the rows it was started with."""
    gram, host, eigh, pid = started
    # a fork waits for the eigh (fd_host); should it not have, the child redoes it: same bits
    lam_np, u_np = eigh.result() if pid == os.getpid() or eigh.done() else eigh_now(host)
    lam, u = torch.from_numpy(lam_np).to(rows.device), torch.from_numpy(u_np).to(rows.device)
    lam, u = lam.flip(0), u.flip(1)  # descending: λ_j = σ_j²
    delta = max(float(lam[ell - 1]), 0.0) if lam.numel() >= ell else 0.0  # λ < 0 is rounding
    keep = lam > delta  # hence λ > 0 below: no 0/0, all-zero rows give k = 0
    lam, u = lam[keep], u[:, keep]  # (k,), (m, k)
    # uᵀM = σ vᵀ, so scaling row j by σ'_j / σ_j = sqrt((λ − δ) / λ) gives σ'_j vᵀ_j.
    scale = torch.sqrt((lam - delta) / lam)[:, None] * u.T  # (k, m) float64
    b = scale.to(rows.dtype) @ rows  # (k, D) float32
    return b, delta, gram.diagonal()


def _gram(rows: Tensor, orthogonal: int) -> Tensor:
    """rows rowsᵀ (m, m) float32, knowing that rows[:orthogonal] are mutually orthogonal."""
    m, o = rows.shape[0], orthogonal
    if o == 0:
        return rows @ rows.T
    old, new = rows[:o], rows[o:]  # (o, D), (n, D)
    gram = torch.empty(m, m, dtype=rows.dtype, device=rows.device)
    gram[:o, :o] = torch.diag(torch.linalg.vector_norm(old, dim=1).square())
    # one product for both blocks that need one: rows newᵀ = [old newᵀ; new newᵀ], (m, n)
    gram[:, o:] = rows @ new.T
    gram[o:, :o] = gram[:o, o:].T  # an (n, o) copy of a small matrix
    return gram


def _sq_norm(rows: Tensor) -> float:
    """‖rows‖²_F accumulated in float64 (millions of small squares), without a float64 copy."""
    return float(torch.linalg.vector_norm(rows, dtype=torch.float64)) ** 2


class FrequentDirections:
    """Fast FD sketch with a 2ℓ-row buffer; shrinks exactly when the buffer holds 2ℓ rows.

    A shrink's eigh runs on the eigh thread while the caller goes on: `update` returns once
    it has started one, and rows that come before it is done wait in a queue (at most 2ℓ of
    them, plus one call's); every read of the sketch waits for it. The rows and the points
    where the buffer shrinks are those of a stream that waited, so the bits are too.

    `finalize` reduces the sketch in place to ≤ ℓ rows (its δ is added to `delta`) and may be
    called any number of times; `update` and `merge` after it are allowed and continue from the
    reduced sketch (the bound still holds, but the bits differ from a stream never finalized).
    """

    def __init__(self, ell: int, dim: int, *, device: str | torch.device = "cpu"):
        ell, dim = positive_int(ell, "sketch size ell"), positive_int(dim, "gradient dimension")
        self._ell, self._dim, self._device = ell, dim, torch.device(device)
        self._buf = torch.zeros(2 * ell, dim, dtype=torch.float32, device=self._device)  # (2ℓ, D)
        self._m = 0  # rows in use: _buf[:_m] is B, then rows not yet shrunk
        self._orthogonal = 0  # _buf[:_orthogonal] is the B of the last shrink: orthogonal rows
        self._n_rows = 0
        self._delta = 0.0  # Δ = Σ δ
        # ‖A‖²_F is counted per shrink over _buf[_uncounted_from:_m], so it does not depend on
        # batch sizes either; rows after _uncounted_from are added on read.
        self._frob_counted = 0.0
        self._uncounted_from = 0
        self._started: _Started | None = None  # the shrink of _buf[:_m] whose eigh runs
        # rows to stream in: [rows, first row not yet in, counted, a copy of our own]
        self._queue: deque[list[Any]] = deque()
        self._queued = 0  # rows in _queue

    @property
    def ell(self) -> int:
        """Sketch size ℓ."""
        return self._ell

    @property
    def dim(self) -> int:
        """Row dimension D."""
        return self._dim

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def n_rows(self) -> int:
        """Rows seen, merged sketches included."""
        return self._n_rows

    @property
    def delta(self) -> float:
        """Δ = Σ δ, the proven bound on ‖AᵀA − BᵀB‖₂."""
        self._drain(wait=True)
        return self._delta

    @property
    def frobenius_sq(self) -> float:
        """‖A‖²_F of every row seen."""
        self._drain(wait=True)
        return self._frob_counted + _sq_norm(self._buf[self._uncounted_from : self._m])

    def rows(self) -> Tensor:
        """The current B, float32 (m, D), m < 2ℓ; a copy, without finalizing."""
        self._drain(wait=True)
        return self._buf[: self._m].clone()

    def update(self, rows: Any, *, checked: bool = False) -> None:
        """Append rows (n, D); shrink whenever the buffer reaches exactly 2ℓ rows.

        `checked`: the caller has made sure every row is finite (pass 1's `usable` mask), so
        the rows are not read once more for that (a D-wide pass, and on CUDA a host sync).
        """
        rows = self._check_rows(rows, finite=not checked)  # (n, D) float32 on device
        self._append(rows, counted=True)
        self._n_rows += rows.shape[0]

    def _append(self, rows: Tensor, counted: bool) -> None:
        """Stream `rows` into the buffer; `counted`: they are data (their squares go into
        ‖A‖²_F), not the rows of another sketch (whose ‖A‖²_F the caller adds)."""
        if rows.shape[0]:
            self._queue.append([rows, 0, counted, False])
            self._queued += rows.shape[0]
            self._drain(wait=False)
            for entry in self._queue:  # rows left waiting: the caller may reuse its tensor
                if not entry[3]:
                    entry[:] = [entry[0][entry[1] :].clone(), 0, entry[2], True]

    def _drain(self, wait: bool) -> None:
        """Stream queued rows into the buffer, shrinking whenever it holds 2ℓ rows. Unless
        `wait`, return once a shrink is started and fewer than 2ℓ rows are left queued."""
        cap = 2 * self._ell
        while True:
            if self._started is not None:
                if not (wait or self._queue):
                    return
                started, self._started = self._started, None
                self._shrunk(started)
            self._fill()
            if self._m < cap:  # every queued row is in
                return
            beside = not wait and self._queued < cap  # else its result is needed at once
            self._started = _start_shrink(self._buf[: self._m], self._orthogonal, beside)
            if beside:
                return

    def _fill(self) -> None:
        """Queued rows into the buffer until it is full or the queue empty."""
        cap = 2 * self._ell
        while self._queue and self._m < cap:
            entry = self._queue[0]
            rows, start, counted, _ = entry
            take = min(rows.shape[0] - start, cap - self._m)
            self._buf[self._m : self._m + take] = rows[start : start + take]
            self._m, entry[1], self._queued = self._m + take, start + take, self._queued - take
            if not counted:
                self._uncounted_from = self._m
            if entry[1] == rows.shape[0]:
                self._queue.popleft()

    def finalize(self) -> tuple[Tensor, Tensor]:
        """Reduce to ≤ ℓ rows, then return sigma (ℓ,) descending and basis V (ℓ, D), float32.

        Basis rows are orthonormal where sigma > 0 and zero where sigma == 0; each row's
        largest-|.| entry is positive. The reduction is applied in place (see the class doc).
        """
        self._drain(wait=True)
        if self._m > self._ell:
            self._shrunk(_start_shrink(self._buf[: self._m], self._orthogonal))
        sigma = torch.zeros(self._ell, dtype=torch.float64, device=self._device)  # (ℓ,)
        basis = torch.zeros(self._ell, self._dim, dtype=torch.float64, device=self._device)
        if self._m:
            s, vh = host_svd(self._buf[: self._m])
            s, vh = s.to(self._device), vh.to(self._device)
            sigma[: s.numel()], basis[: s.numel()] = s, _fix_signs(vh)
        sigma32, basis32 = sigma.float(), basis.float()
        basis32[sigma32 == 0] = 0.0
        return sigma32, basis32

    def merge(self, other: FrequentDirections) -> None:
        """Continue this sketch with other's rows B₂ as if they were streamed in (shrinking
        whenever the buffer reaches 2ℓ rows); totals add. Since ‖A₂ᵀA₂ − B₂ᵀB₂‖₂ ≤ Δ₂, the
        bound holds for the union with Δ = Δ₁ + Δ₂ + the shrinks made here, and a merge costs
        about m₂ / ℓ shrinks (none when the rows fit), not one eigh of the whole stack."""
        if not isinstance(other, FrequentDirections):
            raise InputError(f"can only merge a FrequentDirections sketch, got {type(other)}")
        if (other.ell, other.dim) != (self._ell, self._dim):
            raise InputError(
                f"cannot merge a sketch with ell={other.ell}, dim={other.dim} into one with "
                f"ell={self._ell}, dim={self._dim}: sketch every part with the same settings"
            )
        frob = self.frobenius_sq + other.frobenius_sq  # both drained
        self._frob_counted, self._uncounted_from = frob, self._m  # every row so far counted
        self._append(other._buf[: other._m].to(self._device), counted=False)
        self._drain(wait=True)  # Δ adds up in the order of a stream that waited: bits
        self._delta += other.delta
        self._n_rows += other.n_rows

    def __getstate__(self) -> dict[str, Any]:  # pickle, copy: a running eigh waited for
        self._drain(wait=True)
        return self.__dict__.copy()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; tensors on CPU, loadable with weights_only."""
        self._drain(wait=True)
        return {
            "ell": self._ell,
            "dim": self._dim,
            "rows": self._buf[: self._m].cpu().clone(),  # (m, D) float32
            "n_rows": self._n_rows,
            "frobenius_sq_counted": self._frob_counted,
            "uncounted_from": self._uncounted_from,
            "delta": self._delta,
            "orthogonal_rows": self._orthogonal,
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], *, device: str | torch.device = "cpu"
    ) -> FrequentDirections:
        """Rebuild a sketch from `state_dict()`; its continuation is bit-identical."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise InputError(f"sketch state is missing {missing}: not a FrequentDirections state")
        sketch = cls(int(state["ell"]), int(state["dim"]), device=device)
        rows = state["rows"]
        if not isinstance(rows, Tensor) or rows.dtype != torch.float32:
            raise InputError("sketch state 'rows' must be a float32 tensor")
        if rows.ndim != 2 or rows.shape[1] != sketch.dim or rows.shape[0] >= 2 * sketch.ell:
            raise InputError(
                f"sketch state 'rows' has shape {tuple(rows.shape)}, inconsistent "
                f"with ell={sketch.ell}, dim={sketch.dim}"
            )
        if not 0 <= int(state["uncounted_from"]) <= rows.shape[0]:
            raise InputError("sketch state 'uncounted_from' is out of range")
        # A state without the count (older checkpoints) is safe: every product is made.
        orthogonal = int(state.get("orthogonal_rows", 0))
        if not 0 <= orthogonal <= rows.shape[0]:
            raise InputError("sketch state 'orthogonal_rows' is out of range")
        sketch._set_rows(rows.to(sketch.device), orthogonal)
        sketch._uncounted_from = int(state["uncounted_from"])
        sketch._n_rows = int(state["n_rows"])
        sketch._frob_counted, sketch._delta = (
            float(state["frobenius_sq_counted"]),
            float(state["delta"]),
        )
        return sketch

    def _check_rows(self, rows: Any, finite: bool = True) -> Tensor:
        rows = torch.as_tensor(rows)
        if rows.ndim != 2 or rows.shape[1] != self._dim:
            raise InputError(
                f"sketch rows must have shape (n, {self._dim}), got {tuple(rows.shape)}"
            )
        if rows.is_complex():
            raise InputError("sketch rows must be real, got a complex tensor")
        rows = rows.to(device=self._device, dtype=torch.float32)  # out of float32 range -> inf
        if not finite:
            return rows
        # One fused reduction per row: NaN or ±inf anywhere makes the norm so, and a norm past
        # float32's range (values near 1e19) would make the Gram matrix inf as well. An
        # isfinite mask reads the rows twice and builds an (n, D) bool: 17x slower (256 rows
        # of D = 205,000: 373 vs 22 CPU ms, a fifth of a shrink).
        bad = ~torch.isfinite(torch.linalg.vector_norm(rows, dim=1))  # (n,)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise InputError(
                f"sketch rows contain NaN or infinite values, or values too large to square "
                f"in float32 (first at row {i} of this batch of {rows.shape[0]}); skip or fix "
                "those samples"
            )
        return rows

    def _shrunk(self, started: _Started) -> None:
        """Finish the shrink of the buffer's rows `started` (waiting for its eigh)."""
        b, delta, sq = _end_shrink(self._buf[: self._m], self._ell, started)
        # ‖A‖²_F from the Gram diagonal (float32 squares, summed in float64), never counting
        # rows before _uncounted_from (the B of the last shrink, or another sketch's rows)
        self._frob_counted += float(sq[self._uncounted_from : self._m].double().sum())
        self._set_rows(b, b.shape[0])
        self._delta += delta

    def _set_rows(self, b: Tensor, orthogonal: int) -> None:
        """Make `b` (k, D), k < 2ℓ, the buffer content, all of it counted in ‖A‖²_F; its first
        `orthogonal` rows are known to be mutually orthogonal."""
        self._buf[: b.shape[0]] = b
        self._m = self._uncounted_from = b.shape[0]
        self._orthogonal = orthogonal
