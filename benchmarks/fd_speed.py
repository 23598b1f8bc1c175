"""Issue 12.3, a cheaper FD step: FrequentDirections rows/s before and after, in one run.

"before" is the shrink this project had until the change: the Gram matrix of the whole
2ℓ-row buffer formed in float64, uᵀM in float64, and ‖·‖² and the sign fix through full
copies (kept here, verbatim in substance, as `legacy_*`). "after" is `sage_stream.fd` as it is: float32 products on the rows' device,
and only the new rows' blocks of the Gram matrix (the previous shrink's rows are orthogonal).
Both sketch the same rows (a decaying spectrum plus noise) in the same process, one after the
other, so `speedup` is a ratio measured under the same load. `delta_rel_diff` says how far
the two Δ are apart (float32 rounding; the FD tests bound it).

    python benchmarks/fd_speed.py                # D = 2,570, 51,300, 205,000 at ℓ = 256
    python benchmarks/fd_speed.py --quick        # small D, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from sage_stream import fd as fd_module
from sage_stream.fd import FrequentDirections
from sage_stream.fd_host import eigh_now

RESULTS = Path(__file__).resolve().parent / "results"


def legacy_shrink(rows: torch.Tensor, ell: int, started: object = None) -> tuple:
    """The previous shrink: full float64 Gram, float64 uᵀM, run where the package's shrink
    ends (`_end_shrink`; `started` is not used); ‖row‖² in float64 as `_sq_norm` did."""
    m64 = rows.double()  # (m, D)
    gram = (m64 @ m64.T).cpu().numpy()
    lam, u = (torch.from_numpy(x).to(m64.device) for x in eigh_now(gram))
    lam, u = lam.flip(0), u.flip(1)
    delta = max(float(lam[ell - 1]), 0.0) if lam.numel() >= ell else 0.0
    keep = lam > delta
    lam, u = lam[keep], u[:, keep]
    b = torch.sqrt((lam - delta) / lam)[:, None] * (u.T @ m64)
    return legacy_fix_signs(b).float(), delta, m64.square().sum(dim=1)


def legacy_fix_signs(rows: torch.Tensor) -> torch.Tensor:
    if rows.numel() == 0:
        return rows
    idx = rows.abs().argmax(dim=1, keepdim=True)
    sign = torch.where(rows.gather(1, idx) < 0, -1.0, 1.0).to(rows.dtype)
    return rows * sign


def legacy_sq_norm(rows: torch.Tensor) -> float:
    return float(rows.double().square().sum())


def batches(dim: int, rows: int, batch: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Rows with a decaying spectrum (rank-64 signal, σ_j ∝ 1/(j+1)) plus noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, 64, generator=g))[0].T  # (64, D)
    weights = 1.0 / torch.arange(1, 65, dtype=torch.float32)
    out = []
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        coeff = torch.randn(n, 64, generator=g) * weights * 10
        noise = 0.05 * torch.randn(n, dim, generator=g)
        out.append((coeff @ basis + noise).to(device))
    return out


def sketch(rows: list[torch.Tensor], ell: int, dim: int, device: str) -> tuple[float, float]:
    fd = FrequentDirections(ell, dim, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for batch in rows:
        fd.update(batch)
    delta = fd.delta  # waits for the last shrink's eigh
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, delta


def legacy_sketch(rows: list[torch.Tensor], ell: int, dim: int, device: str) -> tuple[float, float]:
    real = fd_module._start_shrink, fd_module._end_shrink, fd_module._sq_norm
    fd_module._start_shrink = lambda rows, orthogonal, beside=False: (rows, None)  # type: ignore[assignment]
    fd_module._end_shrink, fd_module._sq_norm = legacy_shrink, legacy_sq_norm  # type: ignore[assignment]
    try:
        return sketch(rows, ell, dim, device)
    finally:
        fd_module._start_shrink, fd_module._end_shrink, fd_module._sq_norm = real


def case(dim: int, ell: int, shrinks: int, device: str, repeats: int) -> dict:
    """Each variant `repeats` times, alternating (the first also warms up); the best time."""
    n = 2 * ell + (shrinks - 1) * ell  # the first shrink at 2ℓ rows, then one every ℓ rows
    rows = batches(dim, n, 256, device)
    befores, afters = [], []
    for _ in range(repeats):
        befores.append(legacy_sketch(rows, ell, dim, device))
        afters.append(sketch(rows, ell, dim, device))
    (before_s, before_delta), (after_s, after_delta) = min(befores), min(afters)
    return {
        "dim": dim, "ell": ell, "rows": n, "shrinks": shrinks,
        "before_rows_per_s": round(n / before_s, 1), "after_rows_per_s": round(n / after_s, 1),
        "before_s": round(before_s, 3), "after_s": round(after_s, 3),
        "speedup": round(before_s / after_s, 2),
        "delta_rel_diff": abs(after_delta - before_delta) / max(before_delta, 1e-300),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dims, ell, shrinks = ([512, 2570], 64, 3) if args.quick else ([2570, 51300, 205000], 256, 8)
    rows = []
    with threadpool_limits(args.threads):
        for dim in dims:
            rows.append(case(dim, ell, shrinks, args.device, 3 if dim < 100_000 else 2))
            print(json.dumps(rows[-1]), flush=True)
    body = {
        "benchmark": "fd_speed", "quick": args.quick, "device": args.device,
        "threads": args.threads, "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "load1_start": os.getloadavg()[0], "rows": rows,
        "command": "python benchmarks/fd_speed.py" + (" --quick" if args.quick else ""),
    }  # fmt: skip
    if not args.quick:
        args.results.mkdir(parents=True, exist_ok=True)
        name = f"fd-speed-{args.device}.json"
        (args.results / name).write_text(json.dumps(body, indent=1) + "\n")
        print("->", args.results / name)


if __name__ == "__main__":
    main()
