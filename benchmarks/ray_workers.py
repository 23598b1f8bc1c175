"""Issue 14.4: `sage-stream run --executor ray` with 1 and 2 workers on this machine.

Tiny Parquet samples (a 4-float `features` list, 3 classes) in shards of uneven sizes, the
sage scorer (both passes), on a local Ray cluster of 2 CPUs started here. Each worker count
runs once; the script records the wall time of each run and checks that the two runs wrote
the same bytes (every file under OUT, manifest.json apart from `config.executor`/`workers`).

    python benchmarks/ray_workers.py                 # 24 shards, 240k samples
    python benchmarks/ray_workers.py --quick         # 6 shards, 6k samples, a smoke run
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_parser, work_dir, write_results  # noqa: E402
from scale_run import write_shards  # noqa: E402


def digests(out: Path) -> dict[str, str]:
    found = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            found[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return found


def main() -> None:
    p = cpu_parser(__doc__.splitlines()[0])
    args = p.parse_args()
    n, per_shard = (6_000, 1_000) if args.quick else (240_000, 10_000)
    root = work_dir(args, "ray_workers")
    inputs = write_shards(root, n, per_shard)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    path = os.pathsep.join(q for q in (str(HERE), os.environ.get("PYTHONPATH")) if q)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})  # fmt: skip
    import sage_stream

    rows, outs = [], {}
    try:
        for workers in (1, 2):
            out = root / f"out-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            result = sage_stream.run(
                str(inputs), out=str(out), model="scale_run:tiny", input_key="features",
                label_key="label", keep=0.3, ell=16, batch_size=512, device="cpu",
                executor="ray", workers=workers, progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            rows.append({"workers": workers, "samples": n, "shards": -(-n // per_shard),
                         "seconds": round(seconds, 1), "kept": result.emit.totals["kept"],
                         "samples_per_s": round(n / seconds, 1)})  # fmt: skip
            print(rows[-1], flush=True)
            outs[workers] = digests(out)
    finally:
        ray.shutdown()
    same = outs[1] == outs[2]
    body = {
        "rows": rows,
        "speedup_2_over_1": round(rows[0]["seconds"] / rows[1]["seconds"], 3),
        "outputs_identical_1_vs_2": same,
        "files_compared": len(outs[1]),
    }
    write_results(args, "ray_workers", body)
    print(f"outputs identical with 1 and 2 workers: {same}")


if __name__ == "__main__":
    main()
