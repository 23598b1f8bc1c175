"""Read throughput from S3: sage-stream's tar reader against plain s3fs reads of the same objects.

Where it sits: the first step of every pass streams shards from object storage through
``sage_stream.formats.read_tar`` (a resumable, retrying stream over s3fs, read in bounded
ranged requests, then split into samples). This measures what that layer costs against the
two plain ways of reading the same objects with s3fs: ``cat_file`` (one GET, the whole object
in memory) and a streaming ``open().read()`` in 1 MiB pieces. It is a benchmark, not a test.

The S3 server is moto on 127.0.0.1, in its own process so that it does not share the
reader's interpreter lock. Loopback has no network latency, so this isolates client-side
cost; it says nothing about a real region's bandwidth. Methods are interleaved and rotated
in every repeat, and the ratio is taken within the same run. Peak Python memory per shard
(tracemalloc, in a separate untimed pass) shows the bounded buffering.

    python benchmarks/s3_read.py --quick     # < 30 s
    python benchmarks/s3_read.py --save      # also writes benchmarks/results/s3_read.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "s3_read.json"
MB = 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server():  # noqa: ANN201 - yields the endpoint URL
    """moto in a child process on a free loopback port; stopped on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("moto server did not start within 30 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def shard_bytes(index: int, size: int, member: int) -> bytes:
    """A WebDataset tar of ~``size`` bytes: samples of one ``member``-byte jpg plus a cls."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from shardmaker import tar_bytes

    n = max(1, size // (member + 1536))
    rng = os.urandom  # incompressible payloads, like encoded images
    return tar_bytes({f"s{index:03d}{i:06d}": {"jpg": rng(member), "cls": b"1"} for i in range(n)})


def upload(fs: Any, bucket: str, shards: int, size: int, member: int) -> list[str]:
    fs.mkdir(bucket)
    paths = [f"{bucket}/shard-{i:03d}.tar" for i in range(shards)]
    for i, path in enumerate(paths):
        fs.pipe_file(path, shard_bytes(i, size, member))
    return paths


def read_cat(fs: Any, path: str, options: dict) -> int:
    return len(fs.cat_file(path))


def read_stream(fs: Any, path: str, options: dict) -> int:
    from sage_stream.storage import READ_BLOCK_BYTES

    total = 0
    with fs.open(path, "rb", block_size=READ_BLOCK_BYTES) as f:
        while piece := f.read(2**20):
            total += len(piece)
    return total


def read_sage(fs: Any, path: str, options: dict) -> int:
    from sage_stream.formats import read_tar
    from sage_stream.sample import ShardRef

    ref = ShardRef(url=f"s3://{path}", name=path.rsplit("/", 1)[-1], format="tar")
    total = 0
    for sample in read_tar(ref, options):
        total += sum(len(v) for v in sample.fields.values())
    return total


METHODS: dict[str, Callable[[Any, str, dict], int]] = {
    "s3fs cat_file": read_cat,
    "s3fs open().read()": read_stream,
    "sage-stream read_tar": read_sage,
}


def timed_repeats(fs: Any, paths: list[str], options: dict, repeats: int) -> dict[str, list]:
    """Seconds to read every shard, per method and repeat; order rotates every repeat."""
    names = list(METHODS)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fs.invalidate_cache()
            start = time.perf_counter()
            for path in paths:
                METHODS[name](fs, path, options)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def peak_memory(fs: Any, path: str, options: dict) -> dict[str, float]:
    """Peak Python allocations (MB) while reading one shard, per method (untimed)."""
    peaks = {}
    for name, method in METHODS.items():
        tracemalloc.start()
        method(fs, path, options)
        peaks[name] = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
    return peaks


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("sage-stream", "s3fs", "aiobotocore", "fsspec", "moto"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def run(shards: int, size: int, member: int, repeats: int) -> dict[str, Any]:
    import s3fs

    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    with moto_server() as endpoint:
        options = {"endpoint_url": endpoint}
        fs = s3fs.S3FileSystem(**options)
        paths = upload(fs, "bench", shards, size, member)
        total = sum(fs.size(p) for p in paths)
        seconds = timed_repeats(fs, paths, options, repeats)
        peaks = peak_memory(fs, paths[0], options)
    rates = {name: [total / MB / s for s in secs] for name, secs in seconds.items()}
    median = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "params": {"shards": shards, "shard_bytes": size, "member_bytes": member},
        "repeats": repeats,
        "total_bytes": total,
        "seconds": seconds,
        "mb_per_s_median": median,
        "ratio_to_cat": {n: median[n] / median["s3fs cat_file"] for n in median},
        "ratio_to_stream": {n: median[n] / median["s3fs open().read()"] for n in median},
        "peak_python_mb_one_shard": peaks,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
    }


def table(result: dict[str, Any]) -> str:
    p = result["params"]
    lines = [
        f"S3 read throughput (moto on loopback): {p['shards']} shards x "
        f"{p['shard_bytes'] / MB:.0f} MB, {p['member_bytes'] / 1e3:.0f} kB members, "
        f"median of {result['repeats']}",
        "",
        "| method | MB/s (median) | vs cat_file | vs open().read() | peak Python MB, 1 shard |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rate in result["mb_per_s_median"].items():
        lines.append(
            f"| {name} | {rate:.0f} | {result['ratio_to_cat'][name]:.2f} | "
            f"{result['ratio_to_stream'][name]:.2f} | "
            f"{result['peak_python_mb_one_shard'][name]:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run, under 30 s")
    parser.add_argument("--save", action="store_true", help=f"write {RESULTS}")
    parser.add_argument("--shards", type=int, help="number of shards")
    parser.add_argument("--shard-mb", type=float, help="size of each shard in MB")
    parser.add_argument("--member-kb", type=float, default=100, help="payload member size")
    parser.add_argument("--repeats", type=int, help="timed repeats per method")
    args = parser.parse_args(argv)
    shards = args.shards or (3 if args.quick else 6)
    size = int((args.shard_mb or (8 if args.quick else 64)) * MB)
    repeats = args.repeats or (3 if args.quick else 5)
    result = run(shards, size, int(args.member_kb * 1e3), repeats)
    result["command"] = " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    print(table(result))
    if args.save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
