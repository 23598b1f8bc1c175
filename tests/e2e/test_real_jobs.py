"""Real jobs without glue code: what a new user runs, from the CLI or a config file, on tiny
data made here (mixed-size JPEG/PNG/WebP shards, Hugging Face Parquet, text)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardmaker import image_bytes, make_tar_shard

import sage_stream
from sage_stream.batches import Batch, decoded_batches
from sage_stream.cli import main
from sage_stream.decode import make_decoder
from sage_stream.formats import read_shard
from sage_stream.inputs import expand_inputs

SIZES = [(20, 30), (33, 25), (40, 40), (18, 27)]  # (H, W): no two alike
FORMATS = ["JPEG", "PNG", "WEBP"]


def picture(i: int, label: int) -> np.ndarray:
    """A class-coloured image of one of SIZES, with a little noise."""
    h, w = SIZES[i % len(SIZES)]
    rng = np.random.default_rng(i)
    a = rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
    a[..., label] += 180
    return a


def image_shards(folder: Path, n: int = 48, shards: int = 2) -> list[str]:
    urls = []
    per = n // shards
    for s in range(shards):
        samples = {}
        for i in range(s * per, (s + 1) * per):
            fmt = FORMATS[i % len(FORMATS)]
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
            samples[f"img{i:04d}"] = {ext: image_bytes(picture(i, i % 3), fmt),
                                      "cls": str(i % 3).encode()}  # fmt: skip
        urls.append(make_tar_shard(folder / f"shard-{s:03d}.tar", samples))
    return urls


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return image_shards(tmp_path_factory.mktemp("images"))


COMMON = ["--device", "cpu", "--no-progress", "--ell", "8", "--loader-workers", "0"]


def test_an_image_job_runs_from_the_cli_with_transforms(images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", *images, "--model", "zoo:convnet", "--resize", "24", "--crop", "20",
            "--normalize", "imagenet", "--batch-size", "16", "--keep", "0.5",
            "--out", str(out), *COMMON]  # fmt: skip
    assert main(argv) == 0
    assert "seen 48  scored 48  errored 0  kept 24" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["resize"] == 24 and manifest["config"]["normalize"] == "imagenet"
    rows = pq.read_table(out / "scores").to_pylist()
    assert len(rows) == 48 and all(r["status"] == "ok" for r in rows)


def test_the_same_job_from_a_config_file(images, tmp_path, capsys):
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        'model = "zoo:convnet"\nresize = 24\ncrop = 20\nnormalize = "imagenet"\n'
        'image-mode = "RGB"\nbatch-size = 16\nkeep = 0.5\n'
    )
    assert main(["run", *images, "--config", str(cfg), *COMMON, "--out", str(tmp_path / "a")]) == 0
    flags = ["--model", "zoo:convnet", "--resize", "24", "--crop", "20", "--normalize",
             "imagenet", "--image-mode", "RGB", "--batch-size", "16", "--keep", "0.5"]  # fmt: skip
    assert main(["run", *images, *flags, *COMMON, "--out", str(tmp_path / "b")]) == 0
    sage_stream.run(images, model="zoo:convnet", resize=24, crop=20, normalize="imagenet",
                    image_mode="RGB", batch_size=16, keep=0.5, device="cpu", progress=False,
                    ell=8, loader_workers=0, out=str(tmp_path / "c"))  # fmt: skip
    a = pq.read_table(tmp_path / "a" / "selection.parquet")
    assert a.equals(pq.read_table(tmp_path / "b" / "selection.parquet"))
    assert a.equals(pq.read_table(tmp_path / "c" / "selection.parquet"))


def test_mixed_sizes_batch_in_full_batches(images):
    """With a crop every batch is full; without one, batches are grouped by shape (4 sizes
    here), not cut at every change of size."""
    ref = expand_inputs(images[:1])[0]  # 24 samples, sizes cycling through 4 shapes

    def batches(decoder) -> list[Batch]:
        items = decoded_batches(read_shard(ref), decoder, batch_size=6, num_classes=3)
        return [b for b in items if isinstance(b, Batch)]

    from sage_stream.transforms import ImageTransform

    cropped = batches(make_decoder(transform=ImageTransform(resize=24, crop=20)))
    assert [len(b.keys) for b in cropped] == [6, 6, 6, 6]
    native = batches(make_decoder())
    assert sorted(len(b.keys) for b in native) == [6, 6, 6, 6]
    assert len({tuple(b.x.shape[1:]) for b in native}) == 4
