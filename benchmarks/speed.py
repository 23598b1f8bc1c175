"""Issue 24: the stage against the model's own forward pass, every figure a ratio inside one run.

Rows (docs/benchmarks.md §8), each measured in this one process, one after the other:

    passes   pass 1 / forward-only and pass 2 / forward-only over the same reader: the blob MLP
             (D = 2,570) and the ResNet-18-sized CNN of gpu.py (D = 51,300), ℓ = 256
    fd       FrequentDirections.update against a plain 30-line float32 Gram FD (D = 2,570,
             51,300, 205,000) and against the BLAS limit at D = 51,300: the update's FLOPs at
             the measured float32 GEMM rate, plus the measured eigh, per shrink
    shards   `sketch` over the same samples in 1, 20, 200 and 2,000 shards
    run      a whole default `run --keep 0.3` against a plain streamed forward (tarfile +
             np.load + the model) over the same shards, each run once on one shard first
             (untimed: the model's first calls and the package's imports are not the data's)

On the CPU the times are CPU seconds of this process (`time.process_time`, one thread unless
--threads), so a machine shared with other jobs still gives fair ratios; on CUDA, wall seconds
after a synchronize. Run it against an older checkout of the package (PYTHONPATH) for the
"before" column: it only uses the public API and `FrequentDirections`.

    python benchmarks/speed.py                      # every row, CPU (~10 min on 2 shared cores)
    python benchmarks/speed.py --quick              # small sizes: a smoke run
    python benchmarks/speed.py --only fd,shards     # some rows
    python benchmarks/gpu.py --device cuda          # runs these rows too, on the GPU
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import parser, start, work_dir, write_results
from data import BlobSpec, blob_mlp, proxy_checkpoint, write_blob_shards
from sage_cases import decaying_rows
from threadpoolctl import threadpool_limits

ROWS = ("passes", "fd", "shards", "run")


def settings(quick: bool) -> dict[str, Any]:
    if quick:  # gpu.py's smoke test runs these too: seconds, not minutes
        return {"mlp_n": 600, "mlp_per_shard": 300, "cnn_width": 8, "cnn_n": 64, "cnn_batch": 32,
                "ell": 16, "fd_dims": [520], "fd_limit_dim": 520, "shrinks": 3,
                "sweep_n": 1200, "sweep_shards": [1, 20, 200], "run_n": 1200, "run_shards": 4}  # fmt: skip
    # the CNN case at 2,048 samples: 512 made one FD shrink, and the one-time final SVD (about
    # 1 CPU s at D = 51,300) was most of its pass 1's gap (docs/benchmarks.md §8, s9)
    return {"mlp_n": 16000, "mlp_per_shard": 1000, "cnn_width": 64, "cnn_n": 2048,
            "cnn_batch": 64, "ell": 256, "fd_dims": [2570, 51300, 205000],
            "fd_limit_dim": 51300, "shrinks": 3, "sweep_n": 40000,
            "sweep_shards": [1, 20, 200, 2000], "run_n": 40000, "run_shards": 40}  # fmt: skip


class Clock:
    """CPU seconds of this process (or wall seconds on CUDA) of each timed call; `wall` is
    the wall seconds of the last call (on the CPU, what a user waits: the FD's eigh runs
    on a thread of its own beside the caller, which CPU seconds add up)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.wall = 0.0

    def __call__(self, fn: Callable[[], Any]) -> float:
        self._sync()
        w0 = time.perf_counter()
        t0 = w0 if self.cuda else time.process_time()
        fn()
        self._sync()
        self.wall = time.perf_counter() - w0
        return (time.perf_counter() if self.cuda else time.process_time()) - t0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# --- passes against forward-only ----------------------------------------------------------------
def forward_only(shards: list[str], opts: dict[str, Any]) -> int:
    """The same reader, decoder and batches as the passes, then model(x) and nothing else."""
    from sage_stream.config import make_config
    from sage_stream.passes.loop import build_context, shard_batches

    ctx = build_context(make_config(inputs=shards, **opts))
    seen = 0
    with torch.no_grad():
        for ref in ctx.refs:
            for batch in shard_batches(ctx, ref):
                if hasattr(batch, "x"):
                    ctx.model(batch.x.to(ctx.device))
                    seen += len(batch.keys)
    return seen


def passes_case(clock: Clock, shards: list[str], opts: dict[str, Any], out: Path) -> dict:
    import sage_stream

    shutil.rmtree(out, ignore_errors=True)
    forward_only(shards[:1], {**opts, "out": str(out / "warm")})  # imports, first allocations
    fwd = clock(lambda: forward_only(shards, {**opts, "out": str(out / "fwd")}))
    fwd_wall = clock.wall
    p1 = clock(lambda: sage_stream.sketch(shards, out=str(out / "s"), **opts))
    p1_wall = clock.wall
    p2 = clock(lambda: sage_stream.score(shards, out=str(out / "s"), **opts))
    return {"forward_s": round(fwd, 3), "pass1_s": round(p1, 3), "pass2_s": round(p2, 3),
            "pass1_over_forward": round(fwd / p1, 4), "pass2_over_forward": round(fwd / p2, 4),
            "wall_s": {"forward": round(fwd_wall, 3), "pass1": round(p1_wall, 3),
                       "pass2": round(clock.wall, 3)},
            "pass1_over_forward_wall": round(fwd_wall / p1_wall, 4)}  # fmt: skip


def passes_rows(s: dict, clock: Clock, root: Path, device: str, threads: int) -> dict:
    from gpu import write_image_shards
    from gpu_cases import resnet

    spec = BlobSpec()
    shards = write_blob_shards(root / "blobs", spec, s["mlp_n"], s["mlp_per_shard"])
    model = blob_mlp(spec)
    model.load_state_dict(torch.load(proxy_checkpoint(root, spec), weights_only=True))
    common = dict(ell=s["ell"], device=device, progress=False, loader_workers=0)
    mlp = passes_case(clock, shards, {**common, "model": model.eval(), "batch_size": 256},
                      root / "out-mlp")  # fmt: skip
    images = write_image_shards(root / f"images-{s['cnn_n']}", s["cnn_n"], min(256, s["cnn_n"]))
    cnn_opts = {**common, "model": resnet(s["cnn_width"]), "batch_size": s["cnn_batch"]}
    cnn = passes_case(clock, images, cnn_opts, root / "out-cnn")
    return {"mlp": {"samples": s["mlp_n"], "D": spec.grad_dim, **mlp},
            "cnn": {"samples": s["cnn_n"], "D": 100 * (8 * s["cnn_width"] + 1), **cnn}}  # fmt: skip


# --- FD against a plain FD and against the BLAS limit --------------------------------------------
def plain_fd(batches: list[torch.Tensor], ell: int) -> float:
    """A plain float32 Gram FD: fill 2ℓ rows, eigh of the full Gram, keep ℓ − 1 shrunk rows."""
    dim, dev = batches[0].shape[1], batches[0].device
    buf, m, delta = torch.zeros(2 * ell, dim, device=dev), 0, 0.0
    for rows in batches:
        start = 0
        while start < len(rows):
            take = min(len(rows) - start, 2 * ell - m)
            buf[m : m + take] = rows[start : start + take]
            m, start = m + take, start + take
            if m == 2 * ell:
                gram = (buf @ buf.T).double().cpu().numpy()
                with threadpool_limits(1):  # as the package's eigh: CPU s, not idle threads
                    lam, u = np.linalg.eigh(gram)
                lam, u = lam[::-1], u[:, ::-1]
                d = max(lam[ell - 1], 0.0)
                keep = lam > d
                scale = np.sqrt((lam[keep] - d) / lam[keep])[:, None] * u[:, keep].T
                b = torch.from_numpy(np.ascontiguousarray(scale)).float().to(dev) @ buf
                buf[: len(b)], m, delta = b, len(b), delta + d
    return delta


def sketch_rows(batches: list[torch.Tensor], ell: int) -> float:
    from sage_stream.fd import FrequentDirections

    fd = FrequentDirections(ell, batches[0].shape[1], device=batches[0].device)
    for rows in batches:
        fd.update(rows)
    return fd.delta


def blas_limit(clock: Clock, ell: int, dim: int, device: str) -> float:
    """Seconds per shrink at the BLAS limit: FLOPs of the new-rows Gram (2ℓ × (ℓ+1) × D) and
    of B = S·M ((ℓ−1) × 2ℓ × D) at the measured float32 GEMM rate, plus one 2ℓ×2ℓ eigh."""
    a = torch.randn(2 * ell, dim, device=device)
    b = torch.randn(ell + 1, dim, device=device)
    c = torch.randn(ell - 1, 2 * ell, device=device)
    reps = 3
    gemm = clock(lambda: [(a @ b.T, c @ a) for _ in range(reps)]) / reps
    gram = np.random.default_rng(0).random((2 * ell, 2 * ell))
    gram = gram @ gram.T
    with threadpool_limits(1):  # one thread, as the package runs it (CPU s count every thread)
        eig = Clock("cpu")(lambda: [np.linalg.eigh(gram) for _ in range(reps)]) / reps
    return gemm + eig


def fd_rows(s: dict, clock: Clock, device: str) -> dict:
    ell, out = s["ell"], {}
    for dim in s["fd_dims"]:
        n = 2 * ell + (s["shrinks"] - 1) * (ell + 1)  # exactly `shrinks` shrinks
        rows = decaying_rows(n, dim, seed=dim, device=device)
        batches = list(rows.split(64))
        sketch_rows(batches[:1], ell)  # warm-up
        ours = clock(lambda batches=batches: sketch_rows(batches, ell))
        plain = clock(lambda batches=batches: plain_fd(batches, ell))
        row = {"rows": n, "shrinks": s["shrinks"], "fd_s": round(ours, 3),
               "plain_s": round(plain, 3), "fd_over_plain": round(plain / ours, 4)}  # fmt: skip
        if dim == s["fd_limit_dim"]:
            limit = blas_limit(clock, ell, dim, device) * s["shrinks"]
            row.update(limit_s=round(limit, 3), fd_over_limit=round(limit / ours, 4))
        if dim == s["fd_limit_dim"]:
            row["buffer_sweep"] = buffer_sweep(clock, ell, dim, device)
        out[str(dim)] = row
        del rows, batches
    return out


def buffer_sweep(clock: Clock, ell: int, dim: int, device: str) -> dict:
    """The shrink's cost per new row when it runs every b rows instead of every ℓ + 1 (the
    package's 2ℓ buffer): one `_shrink` of the ℓ − 1 orthogonal rows of a previous shrink plus
    b new rows, eigh included. The cheapest b is the shrink frequency to use on this device."""
    from sage_stream.fd import _shrink

    rows = decaying_rows(4 * ell, dim, seed=dim + 1, device=device)
    b0, _, _ = _shrink(rows[: 2 * ell], ell)  # ℓ − 1 orthogonal rows, as after a shrink
    out, reps = {}, 3
    for new in (ell // 4, ell // 2, ell + 1, 2 * ell):
        buf = torch.cat([b0, rows[2 * ell : 2 * ell + new]])
        sec = clock(lambda buf=buf: [_shrink(buf, ell, b0.shape[0]) for _ in range(reps)]) / reps
        out[str(new)] = {"ms_per_shrink": round(1e3 * sec, 2),
                         "us_per_row": round(1e6 * sec / new, 2)}  # fmt: skip
    return out


# --- shard count, and the whole run against a plain forward --------------------------------------
def resharded(root: Path, spec: BlobSpec, n: int, shards: int) -> list[str]:
    per = -(-n // shards)
    return write_blob_shards(root / f"sweep-{shards}", spec, n, per)


def shards_rows(s: dict, clock: Clock, root: Path, device: str, model: torch.nn.Module) -> dict:
    import sage_stream

    spec, out = BlobSpec(), {}
    opts = dict(model=model, ell=s["ell"], batch_size=256, device=device, progress=False,
                loader_workers=0)  # fmt: skip
    for count in s["sweep_shards"]:
        shards = resharded(root, spec, s["sweep_n"], count)
        dest = root / f"out-sweep-{count}"
        shutil.rmtree(dest, ignore_errors=True)
        out[str(count)] = round(
            clock(lambda sh=shards, d=dest: sage_stream.sketch(sh, out=str(d), **opts)), 3
        )
    one = out[str(s["sweep_shards"][0])]
    return {"samples": s["sweep_n"], "cpu_s": out,
            "over_one_shard": {k: round(v / one, 4) for k, v in out.items()}}  # fmt: skip


def plain_forward(shards: list[str], model: torch.nn.Module, batch: int) -> int:
    """tarfile + np.load + the model, nothing else: the floor a whole run is compared with."""
    seen, xs = 0, []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for shard in shards:
            with tarfile.open(shard, "r|") as tar:
                for member in tar:
                    if member.name.endswith(".npy"):
                        xs.append(np.load(io.BytesIO(tar.extractfile(member).read())))
                    if len(xs) == batch:
                        model(torch.from_numpy(np.stack(xs)).to(dev))
                        seen, xs = seen + len(xs), []
        if xs:
            model(torch.from_numpy(np.stack(xs)).to(dev))
            seen += len(xs)
    return seen


def run_rows(s: dict, clock: Clock, root: Path, device: str, model: torch.nn.Module) -> dict:
    import sage_stream

    shards = resharded(root, BlobSpec(), s["run_n"], s["run_shards"])
    dest, warm = root / "out-run", root / "out-run-warm"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(warm, ignore_errors=True)  # else the warm-up finds its output and stops
    opts = dict(model=model, ell=s["ell"], batch_size=256, device=device, progress=False,
                loader_workers=0, keep=0.3)  # fmt: skip
    # both warmed on one shard first, untimed: the model's first calls, the package's imports
    plain_forward(shards[:1], model, 256)
    sage_stream.run(shards[:1], out=str(warm), **opts)
    plain = clock(lambda: plain_forward(shards, model, 256))
    plain_wall = clock.wall
    whole = clock(lambda: sage_stream.run(shards, out=str(dest), **opts))
    return {"samples": s["run_n"], "shards": s["run_shards"], "plain_forward_s": round(plain, 3),
            "run_s": round(whole, 3), "run_over_plain": round(whole / plain, 3),
            "wall_s": {"plain_forward": round(plain_wall, 3), "run": round(clock.wall, 3)},
            "run_over_plain_wall": round(clock.wall / plain_wall, 3)}  # fmt: skip


def measure(s: dict, rows: tuple[str, ...], root: Path, device: str, threads: int) -> dict:
    """Every asked-for row, in this process (gpu.py calls this on the GPU)."""
    clock, result = Clock(device), {}
    spec = BlobSpec()
    model = blob_mlp(spec)
    model.load_state_dict(torch.load(proxy_checkpoint(root, spec), weights_only=True))
    model = model.eval().to(device)
    if "passes" in rows:
        result["passes"] = passes_rows(s, clock, root, device, threads)
    if "fd" in rows:
        result["fd"] = fd_rows(s, clock, device)
    if "shards" in rows:
        result["shards"] = shards_rows(s, clock, root, device, model)
    if "run" in rows:
        result["run"] = run_rows(s, clock, root, device, model)
    return result


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(ROWS), help=f"rows to run, of {','.join(ROWS)}")
    p.add_argument("--tag", default="", help="a name for this run in the results file")
    p.add_argument("--cnn-n", type=int, default=0, help="CNN samples in the passes rows "
                   "(default 2,048; fewer shows the one-time costs more)")  # fmt: skip
    args = p.parse_args()
    start(args)
    rows = tuple(r for r in args.only.split(",") if r)
    root = work_dir(args, "speed")
    s = settings(args.quick)
    if args.cnn_n:
        s["cnn_n"] = args.cnn_n
    import sage_stream

    body = {"settings": s, "package": str(Path(sage_stream.__file__).parent), "tag": args.tag,
            "timer": "wall s" if args.device.startswith("cuda") else "process CPU s"}  # fmt: skip
    body.update(measure(s, rows, root, args.device, args.threads))
    name = f"speed{'-' + args.tag if args.tag else ''}"
    write_results(args, name, body)


if __name__ == "__main__":
    main()
