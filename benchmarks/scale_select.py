"""Issue 14.4: `select` over 10^7 and 10^8 synthetic score rows, peak RSS and time each.

The rows are written as a run's scores/ (one Parquet part per shard, the columns pass 2
writes), with 10 classes, values on a grid of 10^-4 (so ties are common) and 3% error rows.
Each case runs in its own child process, which reports its peak RSS (VmHWM) after import and
at the end, and its wall time:

    streaming   sage_stream.select(out=..., keep=0.3): select/bounded.py, one part at a time
    in_memory   the reference: every part read into one table, select.reference.select, written

Streaming memory should be flat from 10^7 to 10^8 rows; the in-memory baseline runs at the
smallest size only (at 10^8 it needs tens of GiB), in the same run, as the ratio's baseline.

    python benchmarks/scale_select.py                       # 10^7 and 10^8 rows (minutes)
    python benchmarks/scale_select.py --sizes 10000000      # one size
    python benchmarks/scale_select.py --quick               # 2·10^4 and 8·10^4 rows, a smoke run
"""

from __future__ import annotations

import argparse
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

ROWS_PER_PART = 100_000
CLASSES = 10


def write_scores(root: Path, n: int, per_part: int) -> Path:
    """OUT/scores/part-<shard>.parquet with n rows in parts of per_part; reused if present."""
    from sage_stream.outputs.tables import SCORE_SCHEMA

    out = root / f"out-{n}"
    done = out / "scores.done"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "scores").mkdir(parents=True)
    rng = np.random.default_rng(n)
    for p, start in enumerate(range(0, n, per_part)):
        m = min(per_part, n - start)
        shard = f"shard-{p:06d}.tar"
        keys = pa.array(np.char.add("k", np.arange(start, start + m).astype("U9")))
        status = np.where(rng.random(m) < 0.03, "error", "ok")
        table = pa.table({
            "__key__": keys,
            "__shard__": pa.array([shard] * m),
            "label": rng.integers(0, CLASSES, m),
            "score": np.round(rng.normal(0.5, 0.2, m), 4),
            "loss": rng.exponential(1.0, m),
            "grad_norm": rng.exponential(1.0, m),
            "energy": rng.random(m),
            "coverage": rng.random(m),
            "status": pa.array(status),
            "reason": pa.nulls(m, pa.string()),
            "digest": rng.integers(-(2**63), 2**63 - 1, m, dtype=np.int64),
        })  # fmt: skip
        for field in SCORE_SCHEMA:  # columns pass 2 leaves null where it has no value
            if field.name not in table.column_names:
                table = table.append_column(field, pa.nulls(m, field.type))
        table = table.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)  # as pass 2 writes it
        pq.write_table(table, out / "scores" / f"part-{shard}.parquet")
    done.write_text("")
    return out


def child(case: str, out: str, keep: float) -> None:
    """One case, in this process; prints RESULT {...}."""
    import sage_stream

    base = _vmhwm_mib()
    start = time.perf_counter()
    if case == "streaming":
        result = sage_stream.select(out=out, keep=keep)
        kept = result.kept
    else:
        from sage_stream.outputs.folder import OutputFolder
        from sage_stream.outputs.tables import read_scores, write_selection
        from sage_stream.select.reference import select

        folder = OutputFolder(out)
        table = read_scores(folder, folder.scored_shards())
        chosen = select(table, keep=keep)
        write_selection(folder, chosen, {"keep": keep})
        kept = chosen.num_rows
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({"kept": kept, "seconds": round(seconds, 2),
                                  "peak_rss_mib": _vmhwm_mib(), "rss_after_import_mib": base}))  # fmt: skip


def _vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return round(kib / 1024, 1)


def run_child(
    case: str, out: Path, keep: float, timeout: float, script: str = __file__,
    pythonpath: str | None = None, one_thread: bool = True,
) -> dict:  # fmt: skip
    """`script --child case` in a fresh process on one thread (unless not `one_thread`: then
    with the thread pools a user's process gets); its RESULT line as a dict (select_speed.py
    runs its cases through this too, `pythonpath` for another checkout)."""
    cmd = [sys.executable, script, "--child", case, "--out", str(out), "--keep", str(keep)]
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if one_thread:
            env[name] = "1"
        else:
            env.pop(name, None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"case": case, "status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {"case": case, "status": "ok", **json.loads(line[7:])}
    return {"case": case, "status": "error", "detail": proc.stderr.strip()[-800:]}


def main() -> None:
    p = cpu_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=None)
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.out, args.keep)
        return
    sizes = args.sizes or ([20_000, 80_000] if args.quick else [10**7, 10**8])
    per_part = 2_000 if args.quick else ROWS_PER_PART
    root = work_dir(args, "scale_select")
    rows = []
    for i, n in enumerate(sizes):
        out = write_scores(root, n, per_part)
        cases = ["streaming", "in_memory"] if i == 0 else ["streaming"]
        for case in cases:
            got = {
                "n": n,
                "parts": -(-n // per_part),
                **run_child(case, out, args.keep, args.timeout),
            }
            print(got, flush=True)
            rows.append(got)
    stream = [r for r in rows if r["case"] == "streaming" and r["status"] == "ok"]
    body = {
        "rows": rows,
        "streaming_peak_growth_largest_over_smallest": (
            round(stream[-1]["peak_rss_mib"] / stream[0]["peak_rss_mib"], 3)
            if len(stream) > 1 else None
        ),
    }  # fmt: skip
    write_results(args, "scale_select", body)


if __name__ == "__main__":
    main()
