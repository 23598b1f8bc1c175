"""The host's LAPACK for the FD sketch (fd.py): each shrink's eigh on one thread of numpy's
BLAS, on a thread of its own beside the caller where that is safe, and the final SVD.

LAPACK releases the GIL, so while a shrink's eigh runs here the caller reads, decodes and
computes the next rows; fd.py decides when to wait for it. Only numpy arrays cross to the
eigh thread: every torch (and CUDA) operation stays on the caller's thread and stream.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor


@functools.cache
def _controllers() -> tuple[ThreadpoolController, ThreadpoolController]:
    """Every BLAS and OpenMP library, and numpy's BLAS alone; found once, since a fresh
    threadpool_limits() scans the process's libraries every time (2 ms, as long as a small
    shrink's eigh)."""
    every = ThreadpoolController()
    return every, every.select(user_api="blas")


@functools.cache
def _eigh_beside() -> bool:
    """Whether the eigh may run beside the caller: only where numpy's BLAS is its own bundled
    OpenBLAS, which the caller's torch never uses (a BLAS shared with torch, as in conda's
    MKL builds, would see its thread count change under the caller's products)."""
    libs = _controllers()[1].lib_controllers
    return bool(libs) and all("scipy_openblas" in lib.prefix for lib in libs)


# The thread that runs shrinks' eigh (LAPACK releases the GIL) while the caller makes the next
# rows: one, so eighs run in the order they were started.
_EIGH: list[ThreadPoolExecutor] = []


def _eigh_thread() -> ThreadPoolExecutor:
    if not _EIGH:
        _EIGH.append(ThreadPoolExecutor(1, thread_name_prefix="sage-fd-eigh"))
    return _EIGH[0]


def _idle_before_fork() -> None:
    """A fork waits for the eighs started so far: a child copied while LAPACK held its locks
    could never take them. The child has no eigh thread and starts its own."""
    if _EIGH:
        with contextlib.suppress(RuntimeError):  # shut down at exit: nothing runs any more
            _EIGH[0].submit(int).result()


os.register_at_fork(before=_idle_before_fork, after_in_child=_EIGH.clear)


def start_eigh(gram: np.ndarray, beside: bool) -> Future[tuple[np.ndarray, np.ndarray]]:
    """eigh of a small float64 Gram matrix (ascending): running on the eigh thread if
    `beside` and the eigh may run beside the caller here (see _eigh_beside), else done."""
    if beside and _eigh_beside():
        return _eigh_thread().submit(_eigh, gram, _controllers()[1])
    done: Future[tuple[np.ndarray, np.ndarray]] = Future()
    done.set_result(eigh_now(gram))
    return done


def eigh_now(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same eigh on the calling thread, with every BLAS and OpenMP pool on one thread."""
    return _eigh(gram, _controllers()[0])


def _eigh(gram: np.ndarray, blas: ThreadpoolController) -> tuple[np.ndarray, np.ndarray]:
    """eigh of the small m×m Gram matrix with the host's LAPACK (numpy), whatever the device,
    on one thread of `blas` (milliseconds of work; extra threads only contend).

    One LAPACK for every device and worker keeps sketches made on CPU and GPU alike; and
    torch's threaded eigh was measured 20-50× slower than numpy's on a 2-core machine under
    load (MKL threads spinning), for a matrix that costs milliseconds.
    """
    with blas.limit(limits=1):
        return np.linalg.eigh(gram)


def host_svd(rows: Tensor) -> tuple[Tensor, Tensor]:
    """σ (m,) and V (m, D) of `rows` (m, D), m ≤ ℓ ≪ D, float64 on the host, run once per sketch.

    Unlike the Gram route it gives orthonormal V even for directions whose σ is at rounding
    level: Bᵀ = QR (thin QR, D×m), then the SVD of the small R = U_R S V_Rᵀ, so B = V_R S
    (Q U_R)ᵀ. On one thread, so that the bits do not depend on the machine's core count; a
    direct SVD of the m×D matrix took 3× longer here (docs/benchmarks.md).
    """
    m64 = rows.double().cpu()  # (m, D)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, r = torch.linalg.qr(m64.T)  # (D, m), (m, m)
        u_r, s, _ = torch.linalg.svd(r, full_matrices=False)  # R = U_R S V_Rᵀ
        vh = (q @ u_r).T  # (m, D): right singular vectors of B
    finally:
        torch.set_num_threads(threads)
    return s, vh.contiguous()
