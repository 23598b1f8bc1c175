"""Issues 15 and 25: peak memory and time of reading hostile shards stay under a bound.

Each case runs in its own child process, which reads its shard and decodes every sample the
way pass 1 does (`formats.read_shard` + the built-in decoder), and reports how many samples
came out, how many were errors, whether the shard ended with a shard error, the seconds the
read took (`read_s`, the child's own clock around the read: interpreter start-up excluded)
and its peak RSS (VmHWM in /proc/self/status). The baseline is the same child over an
ordinary shard, measured in the same run; the bound is stated relative to it: every hostile
case must peak under baseline + max_sample_bytes + max_member_bytes (512 + 256 MiB by
default), what one sample may hold while its last member is read. A child that outlives
--timeout seconds is killed and recorded as timed out (a claim-driven skip would otherwise
run for half an hour).

Cases (what each did to the code before the issue that bounded it):
  sparse        10 GNU sparse members of 250 MiB declared size, ~10 KB on disk      (15: 2.68 GB)
  gzip          a gzip stream named .tar: one sample of 8 members x 200 MiB zeros    (15: 2.9 GB)
  png           one 84 Mpx PNG (9165 x 9165, RGB), a few hundred KB                  (15: 2.64 GB)
  parquet       10^6 rows in one row group                                          (15: 1.54 GB)
  pax-claim     a 70 KB tar whose pax header claims a 10^12 byte member             (25: ~30 min)
  base256-claim the same claim as a base-256 size field in the ustar header          (25)
  pax-header    a .tar.gz whose pax extended header holds 256 MiB of text            (25: +800 MiB)
  long-name     a .tar.gz whose GNU long name is 256 MiB                             (25: +800 MiB)

    python benchmarks/hostile_memory.py            # all cases
    python benchmarks/hostile_memory.py --quick    # smaller bombs, same limits (a smoke run)
    python benchmarks/hostile_memory.py --code /path/to/old/checkout --timeout 60
                                                   # the same cases on another checkout
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from hostile_tars import header, pax_record, sample, write_big_header_tgz  # noqa: E402
from hostile_tars import pax as pax_header  # noqa: E402

# Worst case by construction: a sample holds up to max_sample_bytes (512 MiB) while its last
# member (at most max_member_bytes, 256 MiB) is read, so the bound is their sum.
BOUND_MIB = 512 + 256
ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from sage_stream.config import Config, shard_options
from sage_stream.decode.decoder import make_decoder
from sage_stream.errors import SampleError, ShardError
from sage_stream.formats import read_shard
from sage_stream.inputs import expand_inputs
url, input_key, label_key = sys.argv[1], sys.argv[2] or None, sys.argv[3]
(ref,) = expand_inputs([url])
decode = make_decoder(input_key=input_key, label_key=label_key)
seen = errors = 0
shard_error = None
start = time.monotonic()
try:
    for sample in read_shard(ref, **shard_options(Config(), ref.format)):
        seen += 1
        if sample.error is not None:
            errors += 1
            continue
        try:
            decode(sample)
        except SampleError:
            errors += 1
except ShardError as e:
    shard_error = e.reason[:200]
read_s = time.monotonic() - start
# VmHWM: this process image's peak RSS (ru_maxrss would carry the parent's over the exec)
peak = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
print(json.dumps({"seen": seen, "errors": errors, "shard_error": shard_error,
                  "read_s": round(read_s, 2), "peak_kib": peak}))
"""


def claim_tar(path: Path, pax: bool) -> None:
    """A 70 KB tar: one sample, then a member whose header claims 10^12 bytes (issue 25)."""
    claim = 10**12
    first = sample("s0")
    if pax:
        path.write_bytes(first + pax_header(pax_record("size", str(claim))) + header("s1.npy")
                         + b"x" * 70_000)  # fmt: skip
    else:
        path.write_bytes(first + header("s1.npy", claim) + b"x" * 70_000)


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def ordinary_tar(path: Path, n: int = 200) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for name, data in ((f"s{i:05d}.npy", npy(np.ones(8, np.float32))),
                               (f"s{i:05d}.cls", b"1")):  # fmt: skip
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def sparse_tar(path: Path, members: int, declared: int) -> None:
    """GNU sparse members (typeflag S) with no data and a large real size in the header."""
    out = bytearray()
    for i in range(members):
        info = tarfile.TarInfo(f"b000.f{i}.npy")
        header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))[:512]
        header[156:157] = b"S"
        header[483:495] = f"{declared:011o}\0".encode()  # realsize
        header[148:156] = b" " * 8
        header[148:156] = f"{sum(header):06o}\0 ".encode()
        out += header
    out += b"\0" * 1024
    path.write_bytes(bytes(out))


def gzip_tar(path: Path, members: int, size: int) -> None:
    zeros = b"\0" * 2**20
    with gzip.open(path, "wb", compresslevel=6) as gz, tarfile.open(fileobj=gz, mode="w|") as tf:
        for i in range(members):
            info = tarfile.TarInfo(f"b000.f{i}.npy")
            info.size = size

            class Zeros(io.RawIOBase):
                left = size

                def readable(self) -> bool:
                    return True

                def readinto(self, b: Any) -> int:
                    n = min(len(b), self.left, len(zeros))
                    b[:n] = zeros[:n]
                    self.left -= n
                    return n

            tf.addfile(info, io.BufferedReader(Zeros()))


def png_tar(path: Path, side: int) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, format="PNG")
    png = buf.getvalue()
    with tarfile.open(path, "w") as tf:
        for name, data in (("big.png", png), ("big.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def big_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.ones((rows, 8), np.float32)
    features = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)
    table = pa.table({"__key__": [f"r{i:07d}" for i in range(rows)],
                      "features": pa.array(features.to_pylist(), pa.list_(pa.float32())),
                      "label": np.ones(rows, np.int64)})  # fmt: skip
    pq.write_table(table, path, row_group_size=rows)


def measure(
    url: Path, input_key: str = "", label_key: str = "cls", code: Path = ROOT,
    timeout: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(code), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(url), input_key, label_key],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=str(code))  # fmt: skip  # `-c` puts the cwd first on sys.path
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"timed_out_after_s": timeout, "bytes_on_disk": url.stat().st_size}
    if proc.returncode != 0:
        lines = err.decode().strip().splitlines() or ["(no output)"]
        return {"crashed": lines[-1][:300], "returncode": proc.returncode,
                "bytes_on_disk": url.stat().st_size}  # fmt: skip
    found = json.loads(out)
    peak_kib = found.pop("peak_kib")
    return {
        **found,
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "wall_s": round(time.monotonic() - start, 2),
        "bytes_on_disk": url.stat().st_size,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller bombs (a smoke run)")
    p.add_argument("--work", default="/tmp/sage-hostile-memory", help="where the shards go")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument(
        "--code",
        type=Path,
        default=ROOT,
        help="the checkout whose sage_stream the children import (default: this one)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    p.add_argument(
        "--case",
        action="append",
        default=[],
        help="only this case (repeatable; the baseline always runs)",
    )
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mib = 2**20
    q = args.quick
    ordinary_tar(work / "baseline.tar")
    sparse_tar(work / "sparse.tar", 10, 250 * mib)
    gzip_tar(work / "gzip.tar", 3 if q else 8, 200 * mib)
    png_tar(work / "png.tar", 6000 if q else 9165)
    big_parquet(work / "rows.parquet", 10**5 if q else 10**6)
    header = (32 if q else 256) * mib
    claim_tar(work / "pax-claim.tar", pax=True)
    claim_tar(work / "base256-claim.tar", pax=False)
    write_big_header_tgz(work / "pax-header.tar.gz", "pax", header)
    write_big_header_tgz(work / "long-name.tar.gz", "long", header)
    cases = [("baseline", work / "baseline.tar", "", "cls"),
             ("sparse", work / "sparse.tar", "", "cls"),
             ("png", work / "png.tar", "", "cls"),
             ("parquet", work / "rows.parquet", "features", "label"),
             ("gzip", work / "gzip.tar", "", "cls"),
             ("pax-claim", work / "pax-claim.tar", "", "cls"),
             ("base256-claim", work / "base256-claim.tar", "", "cls"),
             ("pax-header", work / "pax-header.tar.gz", "", "cls"),
             ("long-name", work / "long-name.tar.gz", "", "cls")]  # fmt: skip
    if args.case:
        cases = [c for c in cases if c[0] == "baseline" or c[0] in args.case]
    rows = {}
    for name, url, input_key, label_key in cases:
        rows[name] = measure(url, input_key, label_key, args.code, args.timeout)
        print(name, rows[name], flush=True)
    base = rows["baseline"]["peak_rss_mib"]
    for row in rows.values():
        if "peak_rss_mib" in row:
            row["over_baseline_mib"] = round(row["peak_rss_mib"] - base, 1)
        row["within_bound"] = row.get("peak_rss_mib", math.inf) <= base + BOUND_MIB
    body = {"bound": f"baseline + {BOUND_MIB} MiB", "quick": q, "cases": rows,
            "timeout_s": args.timeout, "command": " ".join(["python", *sys.argv])}  # fmt: skip
    suffix = ("-quick" if q else "") + ("" if args.code == ROOT else "-other-code")
    out = Path(args.results) / f"hostile-memory{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(f"-> {out}")
    if not all(r["within_bound"] for r in rows.values()):
        raise SystemExit("a hostile case went over the bound, timed out or crashed")


if __name__ == "__main__":
    main()
