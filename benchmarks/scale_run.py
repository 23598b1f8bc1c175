"""Issue 14.4: a full `--scorer random` run at 250k and 2M tiny samples, peak RSS of every step.

The samples are Parquet rows (a 4-float `features` list and a `label`), 10,000 per shard, so
the two sizes have 25 and 200 shards. Each step runs as its own CLI process (`score`,
`select`, `emit`; the random scorer needs no sketch), and its peak RSS comes from `os.wait4`.
The difference between the two sizes, divided by the difference in shards, is what the
driver holds per shard; a step whose peak grew with the samples would show it here.

    python benchmarks/scale_run.py                   # 250k and 2M samples (minutes)
    python benchmarks/scale_run.py --quick           # 20k and 80k samples, a smoke run
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_parser, work_dir, write_results  # noqa: E402

PER_SHARD = 10_000
STEPS = ("score", "select", "emit")


def tiny():  # noqa: ANN201 - the --model factory: a linear classifier on 4 features
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def write_shards(root: Path, n: int, per_shard: int) -> Path:
    folder = root / f"in-{n}"
    if (folder / ".done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for s, start in enumerate(range(0, n, per_shard)):
        m = min(per_shard, n - start)
        features = rng.normal(size=(m, 4)).astype(np.float32)
        table = pa.table({
            "__key__": pa.array(np.char.add("k", np.arange(start, start + m).astype("U9"))),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), 4),
            "label": rng.integers(0, 3, m),
        })  # fmt: skip
        pq.write_table(table, folder / f"shard-{s:05d}.parquet")
    (folder / ".done").write_text("")
    return folder


def run_step(step: str, inputs: Path, out: Path) -> dict:
    common = ["--out", str(out), "--no-progress"]
    args = {
        "score": [str(inputs), "--model", "scale_run:tiny", "--scorer", "random",
                  "--input-key", "features", "--label-key", "label", "--device", "cpu",
                  "--batch-size", "1024", "--loader-workers", "0"],
        "select": ["--keep", "0.3", "--scorer", "random"],
        "emit": [str(inputs), "--scorer", "random", "--loader-workers", "0"],
    }[step]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    cmd = [sys.executable, "-m", "sage_stream", step, *args, *common]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}-{step}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = status
    seconds = time.perf_counter() - start
    return {"step": step, "rc": os.waitstatus_to_exitcode(status), "seconds": round(seconds, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}  # fmt: skip


def main() -> None:
    p = cpu_parser(__doc__.splitlines()[0])
    args = p.parse_args()
    sizes = [20_000, 80_000] if args.quick else [250_000, 2_000_000]
    per_shard = 2_000 if args.quick else PER_SHARD
    root = work_dir(args, "scale_run")
    rows = []
    for n in sizes:
        inputs = write_shards(root, n, per_shard)
        out = root / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        for step in STEPS:
            got = {"n": n, "shards": -(-n // per_shard), **run_step(step, inputs, out)}
            print(got, flush=True)
            rows.append(got)
        manifest = json.loads((out / "manifest.json").read_text())
        rows[-1]["totals"] = manifest["totals"]
    small, large = sizes[0], sizes[-1]
    per_shard_kib = {}
    for step in STEPS:
        a = next(r for r in rows if r["n"] == small and r["step"] == step)
        b = next(r for r in rows if r["n"] == large and r["step"] == step)
        extra = (b["shards"] - a["shards"]) or 1
        per_shard_kib[step] = round((b["peak_rss_mib"] - a["peak_rss_mib"]) * 1024 / extra, 2)
    body = {
        "rows": rows,
        "peak_rss_growth_kib_per_shard": per_shard_kib,
    }
    write_results(args, "scale_run", body)


if __name__ == "__main__":
    main()
