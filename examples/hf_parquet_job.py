"""A Hugging Face Parquet job with no code: a `datasets` image set written with
`.to_parquet()` (an Image feature, stored as `struct<bytes, path>`, and a ClassLabel), the
layout of most image sets on the Hub.

    sage-stream run 'DATA/train-*.parquet' --model examples.models:small_cnn \\
        --model-arg classes=3 --label-key label --resize 36 --crop 32 --normalize imagenet \\
        --keep 0.5 --out OUT

The image column is found by itself (or `--input-key image`, or `image.bytes`); the ClassLabel
column holds the class index. The kept rows come out as Parquet with every column unchanged,
so `datasets.load_dataset("parquet", data_files="OUT/shards/*.parquet")` reads them back.

    python examples/hf_parquet_job.py WORKDIR    # needs `datasets` (the hf extra)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sage_stream.cli import main as sage_stream

FLAGS = ["--model", "examples.models:small_cnn", "--model-arg", "classes=3", "--label-key",
         "label", "--resize", "36", "--crop", "32", "--normalize", "imagenet",
         "--keep", "0.5"]  # fmt: skip


def make_data(folder: Path, n: int = 40, shards: int = 2) -> list[str]:
    import datasets
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "green", "blue"])}
    )
    folder.mkdir(parents=True, exist_ok=True)
    urls, per = [], n // shards
    for s in range(shards):
        images, labels = [], []
        for i in range(s * per, (s + 1) * per):
            h, w = (40 + i % 5 * 4, 48 - i % 3 * 4)
            pixels = np.random.default_rng(i).integers(0, 60, (h, w, 3), dtype=np.uint8)
            pixels[..., i % 3] += 150
            images.append(Image.fromarray(pixels))
            labels.append(i % 3)
        ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        path = folder / f"train-{s:05d}.parquet"
        ds.to_parquet(str(path))
        urls.append(str(path))
    return urls


def main(argv: list[str]) -> int:
    work = Path(argv[0] if argv else "hf-parquet-job")
    inputs = make_data(work / "data")
    extra = argv[1:] or ["--no-progress"]
    return sage_stream(["run", *inputs, *FLAGS, "--out", str(work / "out"), *extra])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
