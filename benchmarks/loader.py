"""Issue 12.1, the decode-bound case: pass 1 with 0, 1, 2 loader workers, in one run.

JPEG shards (64×64 RGB, made here) through a tiny CNN (examples.models:tiny_cnn): decoding a
JPEG costs more than the model's forward for it, so in-process pass 1 waits on the decoder.
Measured in this one process, one after the other over the same shards:

    reader+decoder alone   read, decode and batch every shard in this process, no model
    pass 1, N workers      `sage_stream.sketch(..., loader_workers=N)` for N = 0, 1, 2

`over_in_process` is pass-1 samples/s over that of N = 0, and the sketch.zarr of every N is
compared byte for byte (`same_sketch`): the loader changes the speed, never the answer. Each
worker starts a Python with torch (~2 s here), so a pass must be long enough for the rate to
mean something: hence the 96,000 images.

    python benchmarks/loader.py            # 96,000 images in 48 shards
    python benchmarks/loader.py --quick
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples.models

import sage_stream  # noqa: E402
from sage_stream.config import make_config  # noqa: E402
from sage_stream.formats.tar import TarShardWriter  # noqa: E402
from sage_stream.passes.loop import build_context, shard_batches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def write_jpeg_shards(folder: Path, n: int, shards: int) -> list[str]:
    rng = np.random.default_rng(0)
    means = rng.uniform(40, 215, size=(10, 3))
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s, idx in enumerate(np.array_split(np.arange(n), shards)):
        url = folder / f"shard-{s:03d}.tar"
        with open(url, "wb") as f, TarShardWriter(f) as w:
            for i in idx:
                y = int(i % 10)
                pixels = means[y] + rng.normal(0, 40, (64, 64, 3))
                buf = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    buf, format="JPEG", quality=90
                )
                w.write(f"k{i:06d}", {"jpg": buf.getvalue(), "cls": str(y).encode()})
        urls.append(str(url))
    return urls


def options(ckpt: str) -> dict:
    return dict(model="examples.models:tiny_cnn", checkpoint=ckpt, ell=64, batch_size=64,
                device="cpu", progress=False)  # fmt: skip


def decode_only(urls: list[str], ckpt: str, out: Path) -> float:
    ctx = build_context(make_config(inputs=urls, out=str(out), **options(ckpt)))
    t, seen = time.perf_counter(), 0
    for ref in ctx.refs:
        for batch in shard_batches(ctx, ref):
            seen += len(getattr(batch, "keys", [None]))
    return seen / (time.perf_counter() - t)


def pass1(urls: list[str], ckpt: str, out: Path, workers: int, n: int) -> tuple[float, bytes]:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    sage_stream.sketch(urls, out=str(out), loader_workers=workers, **options(ckpt))
    rate = n / (time.perf_counter() - t)
    files = sorted(p for p in (out / "sketch.zarr").rglob("*") if p.is_file())
    return rate, b"".join(p.read_bytes() for p in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the model process")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, shards = (600, 4) if args.quick else (96000, 48)
    root = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        urls = write_jpeg_shards(root / "shards", n, shards)
        from examples.models import tiny_cnn

        torch.manual_seed(0)
        torch.save(tiny_cnn().state_dict(), root / "proxy.pt")
        ckpt = str(root / "proxy.pt")
        rows = {"decode_only_samples_per_s": round(decode_only(urls, ckpt, root / "d"), 1)}
        sketches = {}
        for workers in (0, 1, 2):
            rate, sketches[workers] = pass1(urls, ckpt, root / f"w{workers}", workers, n)
            rows[f"pass1_workers_{workers}_samples_per_s"] = round(rate, 1)
        base = rows["pass1_workers_0_samples_per_s"]
        for workers in (1, 2):
            rows[f"over_in_process_{workers}"] = round(
                rows[f"pass1_workers_{workers}_samples_per_s"] / base, 3
            )
        rows["same_sketch"] = sketches[0] == sketches[1] == sketches[2]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    body = {
        "benchmark": "loader", "quick": args.quick, "samples": n, "shards": shards,
        "image": "64x64 RGB JPEG q90", "model": "examples.models:tiny_cnn",
        "model_threads": args.threads, "cpus": os.cpu_count(), "machine": platform.machine(),
        "torch": torch.__version__, "load1": os.getloadavg()[0], **rows,
        "command": "python benchmarks/loader.py" + (" --quick" if args.quick else ""),
    }  # fmt: skip
    print(json.dumps(body, indent=1))
    if not args.quick:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "loader-cpu.json").write_text(json.dumps(body, indent=1) + "\n")


if __name__ == "__main__":
    main()
