"""Issue 24.4: `select` against pyarrow's own read + sort + take, and its cost per shard.

Two rows of docs/benchmarks.md §8, each a ratio or a per-shard figure inside one run:

    rows     `sage_stream.select(keep=0.3)` (default scorer) over 10^6 score rows in 10 parts,
             against a plain pyarrow job over the same parts: read the columns select needs,
             sort by (label, score), take the top 30%, write them (`baseline`)
    shards   the same select over 5,000 one-row parts: seconds per shard

The score parts are written once by `scale_select.write_scores` (the columns pass 2 writes). Each
case runs in a fresh child process and reports the CPU seconds of the call itself (imports not
counted, including the API and torch that `sage_stream.select`, a lazy attribute, imports:
about 1.3 s; `time.process_time`, one thread), so a machine shared with other jobs gives fair
ratios. `--package DIR` runs the children against another checkout of the package (the
"before" column); the data and the baseline stay the same.

    python benchmarks/select_speed.py                    # both rows (a few minutes)
    python benchmarks/select_speed.py --quick            # 20,000 rows, 200 shards: a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_parser, work_dir, write_results  # noqa: E402
from scale_select import run_child, write_scores  # noqa: E402

COLUMNS = ["__key__", "__shard__", "label", "score", "coverage", "grad_norm", "status"]


def child(case: str, out: str, keep: float) -> None:
    """One case in this process; prints RESULT {...} with the CPU seconds of the call."""
    if case == "baseline":
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        start = time.process_time()
        table = pq.read_table(Path(out) / "scores", columns=COLUMNS)
        order = pc.sort_indices(table, [("label", "ascending"), ("score", "descending")])
        kept = table.take(order[: int(keep * table.num_rows)])
        pq.write_table(kept, Path(out) / "baseline.parquet")
        n = kept.num_rows
    else:
        import sage_stream

        select = sage_stream.select  # a lazy attribute: imports sage_stream.api and torch
        start = time.process_time()
        n = select(out=out, keep=keep).kept
    print("RESULT " + json.dumps({"kept": n, "cpu_s": round(time.process_time() - start, 3)}))


def run_case(case: str, out: Path, keep: float, package: str | None) -> dict:
    for old in out.iterdir():  # only the scores stay: a select that finds its own output
        if old.name not in ("scores", "scores.done"):  # would redo nothing
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    return run_child(case, out, keep, 3600, script=__file__, pythonpath=package)


def main() -> None:
    p = cpu_parser(__doc__.splitlines()[0])
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--package", default=None, help="checkout whose sage_stream the children run")
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
    body: dict = {"package": args.package or "this checkout"}
    select = run_case("select", rows_out, args.keep, args.package)
    base = run_case("baseline", rows_out, args.keep, None)
    body["rows"] = {"n": n, "parts": parts, "select": select, "baseline": base}
    if select["status"] == base["status"] == "ok":
        body["rows"]["ratio"] = round(select["cpu_s"] / base["cpu_s"], 2)
    per = run_case("select", shards_out, args.keep, args.package)
    body["shards"] = {"shards": shards, "select": per}
    if per["status"] == "ok":
        body["shards"]["ms_per_shard"] = round(1000 * per["cpu_s"] / shards, 2)
    print(json.dumps(body, indent=1), flush=True)
    write_results(args, "select_speed", body)


if __name__ == "__main__":
    main()
