"""What the class-mean filter costs `select` (issue 28): the same score parts with and without
pass 2's 32-number signatures, the default scorer, CPU seconds and peak RSS of one child each.

The parts are `scale_select.py`'s synthetic scores (N rows in parts of N/10) with a signature
column added around 10 class centres, as pass 2 writes it (fixed_size_list<float32>[32]).
Without the column `sage-coverage` falls back to the agreement and τ rule, so the difference
is the class-mean filter's: one more column read, two integer-sum passes and the distances.

    python benchmarks/classmeans_cost.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scale_select import write_scores


def with_signatures(src: Path, dst: Path) -> None:
    """A copy of OUT `src` whose score parts carry signatures around their label's centre."""
    shutil.copytree(src, dst)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (64, 32))
    for part in sorted((dst / "scores").glob("part-*.parquet")):
        t = pq.read_table(part)
        labels = t["label"].to_numpy(zero_copy_only=False)
        sig = (centres[labels % 64] + rng.normal(0, 1, (len(labels), 32))).astype(np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1)), 32)
        i = t.schema.get_field_index("signature")
        t = t.set_column(i, pa.field("signature", column.type), column)
        pq.write_table(t, part)


def child(out: str) -> dict:
    """One select in a fresh process: CPU seconds and peak RSS."""
    code = (f"import resource, sage_stream; r = sage_stream.select(out={out!r}, keep=0.3); "
            "u = resource.getrusage(resource.RUSAGE_SELF); "
            "print(u.ru_utime + u.ru_stime, u.ru_maxrss, r.kept)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    cpu, rss, kept = proc.stdout.split()
    return {"cpu_s": round(float(cpu), 2), "peak_rss_mib": round(int(rss) / 1024, 1),
            "kept": int(kept)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sage-cm-") as work:
        plain = write_scores(Path(work), args.rows, args.rows // 10)
        signed = Path(work) / "signed"
        with_signatures(plain, signed)
        rows = {"without signatures (tau rule)": [], "with signatures (class means)": []}
        for _ in range(args.runs):  # alternate, so that load affects both alike
            rows["without signatures (tau rule)"].append(child(str(plain)))
            rows["with signatures (class means)"].append(child(str(signed)))
    print(json.dumps({"rows": args.rows, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
