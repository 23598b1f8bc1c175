"""Issue 24.4: `select` against pyarrow's own read + sort + take, and its cost per shard.

Two rows of docs/benchmarks.md §8, each a ratio or a per-shard figure inside one run:

    rows     `sage_stream.select(keep=0.3)` (default scorer) over 10^6 score rows in 10 parts,
             against a plain pyarrow job over the same parts: read the columns select needs,
             sort by (label, score), take the top 30%, write them (`baseline`); the signed
             rows also against the same job reading the signature column too, as select
             must for sage-coverage's class means (`baseline_signed`; it writes the same
             columns as `baseline`)
    shards   the same select over 5,000 one-row parts: seconds per shard

The score parts are written once by `scale_select.write_scores` (the columns pass 2 writes, the
signature column null, as `--grad params` writes it). Real runs of the default scorer carry
signatures, and `sage-coverage` then runs its class-mean filter: each row also has a `signed`
variant, the same parts with signatures (`classmeans_cost.with_signatures`), and the signed rows
are also selected once more per run with the thread pools a user's process gets
(`rows_signed_threads`: no OMP/OPENBLAS_NUM_THREADS=1, CPU and wall seconds; a multi-threaded
BLAS spends CPU on select's skinny products that one thread does not). Each case runs in
a fresh child process and reports the CPU seconds of the call itself (imports not counted,
including the API that `sage_stream.select`, a lazy attribute, imports; `time.process_time`,
one thread), so a machine shared with other jobs gives fair ratios. `--runs N` repeats every
case N times, select and baseline alternating, and reports each run's ratio and the median.
`--package DIR` runs the children against another checkout of the package (the "before"
column); the data and the baseline stay the same.

    python benchmarks/select_speed.py                    # both rows, signed or not (minutes)
    python benchmarks/select_speed.py --quick            # 20,000 rows, 200 shards: a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from classmeans_cost import with_signatures  # noqa: E402
from common import cpu_parser, work_dir, write_results  # noqa: E402
from scale_select import run_child, write_scores  # noqa: E402

COLUMNS = ["__key__", "__shard__", "label", "score", "coverage", "grad_norm", "status"]


def child(case: str, out: str, keep: float) -> None:
    """One case in this process; prints RESULT {...} with the CPU seconds of the call."""
    if case in ("baseline", "baseline_signed"):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        # the signed baseline also reads the signatures, as select must for its class means
        read = [*COLUMNS, "signature"] if case == "baseline_signed" else COLUMNS
        start, began = time.process_time(), time.perf_counter()
        table = pq.read_table(Path(out) / "scores", columns=read)
        order = pc.sort_indices(table, [("label", "ascending"), ("score", "descending")])
        kept = table.select(COLUMNS).take(order[: int(keep * table.num_rows)])
        pq.write_table(kept, Path(out) / "baseline.parquet")
        n = kept.num_rows
    else:
        import sage_stream

        select = sage_stream.select  # a lazy attribute: imports sage_stream.api and torch
        start, began = time.process_time(), time.perf_counter()
        n = select(out=out, keep=keep).kept
    cpu, wall = round(time.process_time() - start, 3), round(time.perf_counter() - began, 3)
    print("RESULT " + json.dumps({"kept": n, "cpu_s": cpu, "wall_s": wall}))


def run_case(
    case: str, out: Path, keep: float, package: str | None, one_thread: bool = True
) -> dict:
    for old in out.iterdir():  # only the scores stay: a select that finds its own output
        if old.name not in ("scores", "scores.done"):  # would redo nothing
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    return run_child(case, out, keep, 3600, script=__file__, pythonpath=package,
                     one_thread=one_thread)  # fmt: skip


def signed(out: Path) -> Path:
    """A copy of OUT `out` whose score parts carry signatures (made once, reused)."""
    dst = out.parent / f"{out.name}-signed"
    if not (dst / "scores.done").exists():
        shutil.rmtree(dst, ignore_errors=True)
        with_signatures(out, dst)
    return dst


def _cpu(results: list[dict]) -> list[float | None]:
    return [r["cpu_s"] if r.get("status") == "ok" else None for r in results]


def _ratios(select: list[float | None], base: list[float | None]) -> list[float]:
    return [round(s / b, 2) for s, b in zip(select, base, strict=True) if s and b]


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    p = cpu_parser(__doc__.splitlines()[0])
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--package", default=None, help="checkout whose sage_stream the children run")
    p.add_argument("--runs", type=int, default=3, help="runs of every case, alternating")
    p.add_argument("--tag", default=None, help="results/select_speed-TAG-cpu.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.out, args.keep)
        return
    n, parts, shards = (20_000, 2, 200) if args.quick else (1_000_000, 10, 5_000)
    root = work_dir(args, "select_speed")
    rows_out = write_scores(root / "rows", n, n // parts)
    shards_out = write_scores(root / "shards", shards, 1)
    data = {"rows": rows_out, "rows_signed": signed(rows_out), "shards": shards_out,
            "shards_signed": signed(shards_out)}  # fmt: skip
    cases = (*data, "baseline", "baseline_signed", "rows_signed_threads")
    got: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(args.runs):  # alternating, so that the load falls on every case alike
        for name, out in data.items():
            got[name].append(run_case("select", out, args.keep, args.package))
            if name == "rows":
                got["baseline"].append(run_case("baseline", rows_out, args.keep, None))
            if name == "rows_signed":
                got["baseline_signed"].append(run_case("baseline_signed", out, args.keep, None))
                got["rows_signed_threads"].append(
                    run_case("select", out, args.keep, args.package, one_thread=False)
                )
    body: dict = {"package": args.package or "this checkout", "runs": args.runs}
    base = _cpu(got["baseline"])
    for name in ("rows", "rows_signed"):
        cpu = _cpu(got[name])
        ratios = _ratios(cpu, base)
        body[name] = {"n": n, "parts": parts, "select": got[name], "baseline": got["baseline"],
                      "select_cpu_s_median": _median([c for c in cpu if c]),
                      "baseline_cpu_s_median": _median([b for b in base if b]),
                      "ratios": ratios, "ratio_median": _median(ratios)}  # fmt: skip
    signed_base = _cpu(got["baseline_signed"])
    ratios = _ratios(_cpu(got["rows_signed"]), signed_base)
    body["rows_signed"].update({
        "baseline_signed": got["baseline_signed"],
        "baseline_signed_cpu_s_median": _median([b for b in signed_base if b]),
        "ratios_vs_baseline_signed": ratios, "ratio_vs_baseline_signed_median": _median(ratios),
    })  # fmt: skip
    threaded = got["rows_signed_threads"]
    body["rows_signed_threads"] = {
        "select": threaded, "select_cpu_s_median": _median([c for c in _cpu(threaded) if c]),
        "select_wall_s_median": _median([r["wall_s"] for r in threaded if r.get("wall_s")]),
    }  # fmt: skip
    for name in ("shards", "shards_signed"):
        ms = [round(1000 * c / shards, 3) for c in _cpu(got[name]) if c]
        body[name] = {"shards": shards, "select": got[name], "ms_per_shard": ms,
                      "ms_per_shard_median": _median(ms)}  # fmt: skip
    print(json.dumps(body, indent=1), flush=True)
    write_results(args, f"select_speed-{args.tag}" if args.tag else "select_speed", body)


if __name__ == "__main__":
    main()
