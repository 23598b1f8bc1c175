"""The SAGE cases of the benchmarks (library): the stage's passes, FD update rates, and the
`Phases` timer the other case modules share.

Where it sits: cases.py (the child entry point that `common.run_case` starts) runs one case
from here, from gpu_cases.py or from peer_cases.py. Phases inside a case (load, sketch, score,
select) each get their wall time and their own peak RSS: VmHWM of /proc/self/status, reset
through /proc/self/clear_refs at the start of each phase. Nothing here imports a driver.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from data import BlobSpec, blob_mlp  # benchmarks/ is on sys.path: this script's folder

import sage_stream
from sage_stream.config import make_config
from sage_stream.fd import FrequentDirections
from sage_stream.passes.loop import build_context, shard_batches


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Phases:
    """Wall time and peak RSS of each named phase of a case."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.record: dict[str, dict[str, float]] = {}
        self.baseline_rss_mib: float | None = None  # RSS when the first phase starts

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.baseline_rss_mib is None:  # after imports, model and peers' modules
            self.baseline_rss_mib = round(_status_kib("VmRSS") / 1024, 1)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        entry = {
            "wall_s": round(time.perf_counter() - start, 4),
            "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
        }
        if self.device.startswith("cuda"):
            entry["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.record[name] = entry

    def summary(self) -> dict[str, Any]:
        return {"phases": self.record, "baseline_rss_mib": self.baseline_rss_mib}


def blob_model(p: dict[str, Any]) -> torch.nn.Module:
    """The proxy model of a blob benchmark, weights from the shared checkpoint."""
    model = blob_mlp(BlobSpec(**p["spec"]))
    model.load_state_dict(torch.load(p["checkpoint"], weights_only=True))
    return model.eval()


def key_index(key: str, per_shard: int) -> int:
    """`s{shard:06d}_{i:06d}` (see data.write_blob_shards) -> position in the data set."""
    shard, i = key[1:].split("_")
    return int(shard) * per_shard + int(i)


def save_selection(path: str, idx: np.ndarray, weights: np.ndarray | None = None) -> None:
    w = np.ones(len(idx)) if weights is None else np.asarray(weights, dtype=np.float64)
    np.savez(path, idx=np.asarray(idx, dtype=np.int64), weights=w)


def sage_options(p: dict[str, Any]) -> dict[str, Any]:
    return dict(
        model=blob_model(p),
        out=p["out"],
        ell=p.get("ell", 256),
        batch_size=p.get("batch_size", 256),
        device=p.get("device", "cpu"),
        progress=False,
        loader_workers=0,  # the forward-only pass's reader; benchmarks/loader.py has workers
    )


def _forward(p: dict[str, Any], opts: dict[str, Any]) -> int:
    """Forward-only: the same reader, decoder and batches as the passes, model(x) and no more."""
    ctx = build_context(make_config(inputs=p["shards"], **opts))
    seen = 0
    with torch.no_grad():
        for ref in ctx.refs:
            for batch in shard_batches(ctx, ref):
                ctx.model(batch.x.to(ctx.device))
                seen += len(batch.keys)
    return seen


def _raw_copy(p: dict[str, Any]) -> int:
    """A plain byte copy of the same shards: what emit is measured against."""
    folder = Path(p["out"]) / "raw-copy"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for shard in p["shards"]:
        shutil.copyfile(shard, folder / Path(shard).name)
    return sum(Path(s).stat().st_size for s in p["shards"])


def _save_sage_selection(p: dict[str, Any]) -> None:
    keys = pq.read_table(Path(p["out"]) / "selection.parquet")["__key__"].to_pylist()
    save_selection(p["save"], [key_index(k, p["per_shard"]) for k in keys])


def case_sage(p: dict[str, Any]) -> dict[str, Any]:
    """SAGE through its API, the phases asked for in order: forward (a forward-only pass for
    reference), sketch, score, select, emit, raw_copy. A run that sketches starts clean."""
    if "sketch" in p["phases"]:
        shutil.rmtree(p["out"], ignore_errors=True)
    opts, phase = sage_options(p), Phases(p.get("device", "cpu"))
    shards, out, result = p["shards"], p["out"], {"samples": p["n"]}
    steps = {
        "forward": lambda: {"forward_samples": _forward(p, opts)},
        "sketch": lambda: {"sketch": sage_stream.sketch(shards, **opts).stats},
        "score": lambda: {"seen": sage_stream.score(shards, **opts).seen},
        "select": lambda: {
            "kept": sage_stream.select(out=out, inputs=shards, keep=p["keep"], scorer="sage").kept
        },  # the agreement ranking, which peers.py compares with the exact SVD's
        "dedup_select": lambda: {
            "kept": sage_stream.select(
                out=out, inputs=shards, keep=p.get("keep", 0.3), scorer="random", dedup="on"
            ).kept
        },  # near-copy removal (select/dedup.py) and the selection after it
        "emit": lambda: {"emit": sage_stream.emit(shards, out=out, progress=False).totals},
        "raw_copy": lambda: {"bytes": _raw_copy(p)},
    }
    for name in p["phases"]:
        with phase(name):
            result.update(steps[name]())
    if p.get("save"):
        _save_sage_selection(p)
    return {**phase.summary(), **result}


def decaying_rows(n: int, dim: int, seed: int, device: str) -> torch.Tensor:
    """(n, dim) float32 rows with a decaying spectrum, like gradient features."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / torch.arange(1, dim + 1, dtype=torch.float32).sqrt()  # (dim,)
    return (torch.randn(n, dim, generator=gen) * scale).to(device)


def case_fd(p: dict[str, Any]) -> dict[str, Any]:
    """FD update rows/s for each (D, ℓ): 2ℓ warm-up rows, then `shrinks`·ℓ timed rows."""
    device, rates = p.get("device", "cpu"), []
    for dim, ell in p["grid"]:
        fd = FrequentDirections(ell, dim, device=device)
        rows = decaying_rows((2 + p["shrinks"]) * ell, dim, seed=dim + ell, device=device)
        fd.update(rows[: 2 * ell])  # fills the buffer and does the first shrink
        timed = rows[2 * ell :]
        _sync(device)
        start = time.perf_counter()
        for chunk in timed.split(p.get("batch", 256)):
            fd.update(chunk)
        _sync(device)
        seconds = time.perf_counter() - start
        rates.append({"dim": dim, "ell": ell, "rows": len(timed), "seconds": round(seconds, 4)})
    return {"fd": rates}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def case_throughput(p: dict[str, Any]) -> dict[str, Any]:
    """The passes (case_sage), then FD update rates (case_fd): one child, one import of torch."""
    return {**case_sage(p), "fd": case_fd(p["fd"])["fd"]}
