"""Golden runs: the same CLI jobs before and after a change, compared by what they wrote.

Outputs are a contract. A change that is not meant to change results must leave real runs
byte-identical; one that is meant to change them should show which cases moved and how far. This
script runs a fixed set of `sage-stream` commands (tar and Parquet, every step alone and the whole
run, several scorers and balances, local and Ray) on tiny data it makes itself, and records for
each case the sha256 of every file under OUT, the scores per key and the kept keys.

    python benchmarks/golden.py record before.json            # on the old code
    python benchmarks/golden.py record after.json             # on the new code
    python benchmarks/golden.py compare before.json after.json

`compare` prints, per case: identical files, or the same content where only Parquet files differ
and each holds the same table as before (schema, metadata and rows; another encoding), or which
files differ, the largest score difference and the overlap of the kept sets; it exits 1 when any
case differs in content. `--no-ray` skips the Ray cases
(they start a local Ray, about 10 s and 1.5 GB). The commands run as subprocesses with the
`sage_stream` that `python` imports (set PYTHONPATH to test a checkout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

FIXED_MTIME = 1_700_000_000
HELPERS = Path(__file__).resolve().parent.parent / "tests" / "helpers"

# name -> (input set, list of commands; each command is the arguments after `sage-stream`)
RUN = ["--model", "tiny:mlp", "--ell", "8", "--batch-size", "16", "--seed", "3"]
CASES: dict[str, tuple[str, list[list[str]]]] = {
    "tar-default": ("tar", [["run", "--keep", "0.5"]]),
    "tar-sage-equal": ("tar", [["run", "--keep", "0.3", "--scorer", "sage", "--balance", "equal"]]),
    "tar-min-score": ("tar", [["run", "--min-score", "0"]]),
    "tar-loss": ("tar", [["run", "--keep", "0.4", "--scorer", "loss"]]),
    "tar-random": ("tar", [["run", "--keep", "0.4", "--scorer", "random"]]),
    "tar-none": ("tar", [["run", "--keep", "0.4", "--balance", "none"]]),
    "tar-centroid": ("tar", [["run", "--keep", "0.5", "--consensus", "centroid"]]),
    "tar-params": (
        "tar",
        [["run", "--keep", "0.5", "--grad", "params", "--params", "*", "--project-dim", "16"]],
    ),
    "tar-unlabeled": ("tar", [["run", "--keep", "0.5", "--label-key", "none"]]),
    "tar-steps": ("tar", [["sketch"], ["score"], ["select", "--keep", "0.5"], ["emit"]]),
    "tar-reselect": (
        "tar",
        [["run", "--keep", "0.5"], ["select", "--keep", "0.2", "--scorer", "sage"], ["emit"]],
    ),
    "parquet-default": ("parquet", [["run", "--keep", "0.5"]]),
    "parquet-sage": ("parquet", [["run", "--keep", "0.3", "--scorer", "sage"]]),
    "parquet-steps": ("parquet", [["sketch"], ["score"], ["select", "--keep", "0.5"], ["emit"]]),
    "tar-ray": ("tar", [["run", "--keep", "0.5", "--executor", "ray", "--workers", "2"]]),
    "parquet-ray": ("parquet", [["run", "--keep", "0.5", "--executor", "ray", "--workers", "2"]]),
}
# Steps that take no model options, and the one that takes no inputs either.
NO_MODEL = {"select", "emit"}
NO_INPUT = {"select"}
FORMAT_OPTIONS = {"tar": [], "parquet": ["--label-key", "label"]}


def make_data(root: Path) -> dict[str, Any]:
    """Tiny labelled blobs as 4 uneven tar shards and 3 Parquet shards, and a checkpoint."""
    sys.path.insert(0, str(HELPERS))
    import tiny  # type: ignore[import-not-found]

    x, _, noisy = tiny.blobs(240, flip=0.2, seed=0)
    (root / "tar").mkdir()
    (root / "parquet").mkdir()
    tiny.write_tar_set(root / "tar", x, noisy, shards=4)
    tiny.write_parquet_set(root / "parquet", x, noisy, shards=3)
    checkpoint = tiny.train_checkpoint(root / "mlp.pt", x, noisy)
    for path in root.rglob("*"):  # the manifest pins each shard's size and mtime
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))
    return {"tar": str(root / "tar"), "parquet": str(root / "parquet"), "checkpoint": checkpoint}


def run_case(name: str, data: dict[str, Any], root: Path) -> dict[str, Any]:
    fmt, commands = CASES[name]
    out = root / name
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in [os.environ.get("PYTHONPATH", ""), str(HELPERS)] if p
        ),
    }
    env.setdefault("RAY_AUTH_MODE", "disabled")
    for command in commands:
        argv = [sys.executable, "-m", "sage_stream", *command, "--out", str(out), "--no-progress"]
        if command[0] not in NO_INPUT:
            argv += [data[fmt]]
        if command[0] not in NO_MODEL:
            argv += [
                *FORMAT_OPTIONS[fmt],
                *RUN,
                "--checkpoint",
                data["checkpoint"],
                "--device",
                "cpu",
            ]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=root)
        if done.returncode != 0:
            return {"error": f"{' '.join(command)}: exit {done.returncode}: {done.stderr[-2000:]}"}
    return describe(out, root)


def describe(out: Path, root: Path) -> dict[str, Any]:
    # The data live under a new temporary folder each time: its path, recorded in the manifest,
    # is replaced before hashing so that two recordings compare.
    files = {
        str(p.relative_to(out)): hashlib.sha256(
            p.read_bytes().replace(str(root).encode(), b"<ROOT>")
        ).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "_LEASE"
    }
    # and what each Parquet file holds, apart from how it is encoded: a change of writer options
    # (dictionary pages, compression) changes the bytes of the same table
    tables = {
        str(p.relative_to(out)): table_digest(p, root)
        for p in sorted(out.rglob("*.parquet"))
        if p.is_file()
    }
    scores: dict[str, float | None] = {}
    for part in sorted((out / "scores").glob("*.parquet")):
        table = pq.read_table(part, columns=["__key__", "__shard__", "score"])
        for key, shard, score in zip(
            *(table[c].to_pylist() for c in table.column_names), strict=True
        ):
            scores[f"{Path(shard).name}/{key}"] = score
    kept: list[str] = []
    if (out / "selection.parquet").exists():
        table = pq.read_table(out / "selection.parquet", columns=["__key__", "__shard__"])
        kept = sorted(
            f"{Path(s).name}/{k}"
            for k, s in zip(
                table["__key__"].to_pylist(), table["__shard__"].to_pylist(), strict=True
            )
        )
    return {"files": files, "tables": tables, "scores": scores, "kept": kept}


def table_digest(path: Path, root: Path) -> str:
    """sha256 of a Parquet file's schema, metadata and rows as read back (not of its bytes)."""
    table = pq.read_table(path)
    text = json.dumps(
        {"schema": str(table.schema), "rows": table.to_pydict()}, default=str, sort_keys=True
    )
    return hashlib.sha256(text.replace(str(root), "<ROOT>").encode()).hexdigest()


def record(path: str, cases: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="sage-golden-") as tmp:
        root = Path(tmp)
        data = make_data(root)
        results = {}
        for name in cases:
            results[name] = run_case(name, data, root)
            print(
                f"{name}: {'ERROR ' + results[name]['error'] if 'error' in results[name] else 'ok'}",
                flush=True,
            )
    Path(path).write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"wrote {path}")


def compare_case(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str]:
    """("identical", "encoded" (the same content, some Parquet encoded otherwise) or "differ",
    the line that says so)."""
    if "error" in a or "error" in b:
        same = "identical" if a.get("error") == b.get("error") else "differ"
        return same, f"error before: {a.get('error')!r:.80} / after: {b.get('error')!r:.80}"
    differ = sorted(
        n for n in a["files"].keys() | b["files"].keys() if a["files"].get(n) != b["files"].get(n)
    )
    if not differ:
        return "identical", f"identical ({len(a['files'])} files)"
    ta, tb = a.get("tables", {}), b.get("tables", {})
    same_rows = a["scores"] == b["scores"] and a["kept"] == b["kept"]
    if same_rows and all(n in ta and ta[n] == tb.get(n) for n in differ):  # older: no tables
        return "encoded", (f"same content ({len(a['files'])} files); encoded otherwise: "
                      f"{', '.join(differ)}")  # fmt: skip
    keys = a["scores"].keys() & b["scores"].keys()
    diffs = [
        abs(a["scores"][k] - b["scores"][k])
        for k in keys
        if a["scores"][k] is not None and b["scores"][k] is not None
    ]
    ka, kb = set(a["kept"]), set(b["kept"])
    overlap = len(ka & kb) / max(len(ka | kb), 1)
    shown = ", ".join(differ[:6]) + (f" (+{len(differ) - 6})" if len(differ) > 6 else "")
    return "differ", (
        f"DIFFER in {len(differ)} files: {shown}; score rows {len(a['scores'])} -> "
        f"{len(b['scores'])}, max |Δscore| {max(diffs, default=0.0):.3g}; kept "
        f"{len(ka)} -> {len(kb)}, {'same set' if ka == kb else f'overlap {overlap:.3f}'}"
    )


def compare(before: str, after: str) -> int:
    a, b = json.loads(Path(before).read_text()), json.loads(Path(after).read_text())
    counts = {"identical": 0, "encoded": 0, "differ": 0}
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            print(f"{name}: only in {'after' if name in b else 'before'}")
            continue
        status, text = compare_case(a[name], b[name])
        counts[status] += 1
        print(f"{name}: {text}")
    print(f"{counts['identical']} cases identical, {counts['encoded']} the same content encoded "
          f"otherwise, {counts['differ']} differ")  # fmt: skip
    return 1 if counts["differ"] else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run the golden cases and write their digests")
    rec.add_argument("path")
    rec.add_argument("--no-ray", action="store_true", help="skip the Ray cases")
    rec.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases")
    cmp_ = sub.add_parser("compare", help="compare two recordings")
    cmp_.add_argument("before")
    cmp_.add_argument("after")
    args = parser.parse_args()
    if args.command == "compare":
        return compare(args.before, args.after)
    cases = args.case or [c for c in CASES if not (args.no_ray and c.endswith("-ray"))]
    np.seterr(all="ignore")
    record(args.path, cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
