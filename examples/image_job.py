"""An image job with no code: JPEG/PNG/WebP WebDataset shards of mixed sizes, a CNN factory
with arguments, torchvision-style resize, centre crop and ImageNet normalisation.

The job itself is one command (run from the repository root, so `examples.models` imports):

    sage-stream run 'DATA/shard-{000..001}.tar' --model examples.models:small_cnn \\
        --model-arg classes=3 --resize 36 --crop 32 --normalize imagenet \\
        --keep 0.5 --out OUT

For a torchvision model: `--model torchvision.models:resnet18 --model-arg num_classes=10
--checkpoint resnet18-proxy.pt --resize 256 --crop 224 --normalize imagenet`.

    python examples/image_job.py WORKDIR     # writes tiny shards to WORKDIR/data, runs the job
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sage_stream.cli import main as sage_stream
from sage_stream.formats.tar import TarShardWriter

SIZES = [(40, 52), (36, 36), (64, 48), (45, 60)]  # (H, W): as a scraped image set has them
FLAGS = ["--model", "examples.models:small_cnn", "--model-arg", "classes=3", "--resize", "36",
         "--crop", "32", "--normalize", "imagenet", "--keep", "0.5"]  # fmt: skip


def make_data(folder: Path, n: int = 48, shards: int = 2) -> list[str]:
    """Shards of class-coloured pictures in three formats and four sizes, labels in `cls`."""
    folder.mkdir(parents=True, exist_ok=True)
    urls, per = [], n // shards
    for s in range(shards):
        path = folder / f"shard-{s:03d}.tar"
        with open(path, "wb") as f, TarShardWriter(f) as writer:
            for i in range(s * per, (s + 1) * per):
                label, (h, w) = i % 3, SIZES[i % len(SIZES)]
                pixels = np.random.default_rng(i).integers(0, 60, (h, w, 3), dtype=np.uint8)
                pixels[..., label] += 150
                fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format=fmt)
                writer.write(f"img{i:05d}", {ext: buf.getvalue(), "cls": str(label).encode()})
        urls.append(str(path))
    return urls


def main(argv: list[str]) -> int:
    work = Path(argv[0] if argv else "image-job")
    inputs = make_data(work / "data")
    extra = argv[1:] or ["--no-progress"]
    return sage_stream(["run", *inputs, *FLAGS, "--out", str(work / "out"), *extra])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
