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
from sage_stream.cli import main
from sage_stream.decode.batches import Batch, decoded_batches
from sage_stream.decode.decoder import make_decoder
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

    from sage_stream.decode.images import ImageTransform

    cropped = batches(make_decoder(transform=ImageTransform(resize=24, crop=20)))
    assert [len(b.keys) for b in cropped] == [6, 6, 6, 6]
    native = batches(make_decoder())
    assert sorted(len(b.keys) for b in native) == [6, 6, 6, 6]
    assert len({tuple(b.x.shape[1:]) for b in native}) == 4


def hf_image_parquet(folder: Path, n: int = 36, shards: int = 2) -> list[str]:
    """Shards written by `datasets` itself: an Image feature (struct<bytes, path>) and a
    ClassLabel, as on the Hub."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["r", "g", "b"])}
    )
    urls = []
    per = n // shards
    for s in range(shards):
        rows = range(s * per, (s + 1) * per)
        data = {"image": [Image.fromarray(picture(i, i % 3)) for i in rows],
                "label": [i % 3 for i in rows]}  # fmt: skip
        ds = datasets.Dataset.from_dict(data, features=features)
        path = folder / f"train-{s:05d}.parquet"
        ds.to_parquet(str(path))
        urls.append(str(path))
    return urls


def test_a_hugging_face_parquet_job_runs_with_no_code(tmp_path, capsys):
    urls = hf_image_parquet(tmp_path / "hf")
    schema = pq.read_schema(urls[0])
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    out = tmp_path / "out"
    argv = ["run", *urls, "--model", "zoo:convnet", "--label-key", "label", "--resize", "20",
            "--crop", "20", "--normalize", "imagenet", "--keep", "0.5", "--out", str(out),
            *COMMON]  # fmt: skip
    assert main(argv) == 0
    assert "seen 36  scored 36  errored 0  kept 18" in capsys.readouterr().out
    # the nested key names the same bytes: the same scores
    again = tmp_path / "again"
    argv2 = [*argv[: argv.index("--out")], "--out", str(again), *COMMON, "--input-key",
             "image.bytes"]  # fmt: skip
    assert main(argv2) == 0
    a, b = (pq.read_table(o / "scores").sort_by("__key__") for o in (out, again))
    assert a.column("score").to_pylist() == b.column("score").to_pylist()
    # what it wrote loads back with datasets, images and class labels intact
    datasets = pytest.importorskip("datasets")
    shards = sorted(str(p) for p in (out / "shards").glob("*.parquet"))
    kept = datasets.load_dataset("parquet", data_files=shards, split="train",
                                 cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert kept.num_rows == 18 and kept.features["label"].names == ["r", "g", "b"]
    assert kept[0]["image"].size[0] > 0


def test_pyarrow_written_layouts(tmp_path, capsys):
    """A binary image column found by its bytes, and a struct member named by a nested key."""
    import pyarrow as pa
    from shardmaker import make_parquet_shard

    pics = [image_bytes(picture(i, i % 3), "PNG") for i in range(24)]
    labels = [i % 3 for i in range(24)]
    flat = make_parquet_shard(tmp_path / "flat.parquet", {"jpeg_bytes": pics, "y": labels})
    nested = make_parquet_shard(
        tmp_path / "nested.parquet",
        pa.table(
            {"sample": pa.array([{"img": p, "y": y} for p, y in zip(pics, labels, strict=True)])}
        ),
    )
    base = ["--model", "zoo:convnet", "--crop", "16", "--keep", "0.5", *COMMON]
    assert main(["run", flat, "--label-key", "y", "--out", str(tmp_path / "a"), *base]) == 0
    assert main(["run", nested, "--input-key", "sample.img", "--label-key", "sample.y",
                 "--out", str(tmp_path / "b"), *base]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("seen 24  scored 24  errored 0  kept 12") == 2


def token_parquet(folder: Path, n: int = 30) -> str:
    """Rows of token ids of varying length whose class shows in the ids, and a label."""
    from shardmaker import make_parquet_shard

    rng = np.random.default_rng(0)
    ids = [(rng.integers(1, 20, size=3 + i % 5) + 20 * (i % 3)).tolist() for i in range(n)]
    return make_parquet_shard(
        folder / "tokens.parquet", {"ids": ids, "label": [i % 3 for i in range(n)]}
    )


def test_a_transformers_classifier_runs_from_the_cli(tmp_path, capsys):
    pytest.importorskip("transformers")
    url = token_parquet(tmp_path)
    base = ["run", url, "--model", "zoo:tiny_bert", "--model-arg", "num_labels=3",
            "--preprocess", "zoo:token_inputs", "--keep", "0.5", *COMMON]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "ll")]) == 0
    assert main([*base, "--grad", "params", "--params", "classifier.*,bert.pooler.*",
                 "--out", str(tmp_path / "pm")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("seen 30  scored 30  errored 0  kept 15") == 2
    manifest = json.loads((tmp_path / "ll" / "manifest.json").read_text())
    assert manifest["config"]["model_args"] == {"num_labels": 3}


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    """Shards with inputs only (no cls member), and the proxy trained on the labelled set."""
    from shardmaker import npy_bytes
    from tiny import blobs, train_checkpoint

    root = tmp_path_factory.mktemp("unlabeled")
    x, y, _ = blobs(60, flip=0.0)
    samples = {f"u{i:03d}": {"npy": npy_bytes(x[i])} for i in range(60)}
    return make_tar_shard(root / "u.tar", samples), train_checkpoint(root / "p.pt", x, y), y


def test_unlabeled_data_from_the_cli_and_a_config_file(unlabeled, tmp_path, capsys):
    url, ckpt, _ = unlabeled
    base = ["run", url, "--model", "tiny:mlp", "--checkpoint", ckpt, "--keep", "0.5", *COMMON]
    # without a label, the default `cls` is missing: one line naming what to pass
    assert main([*base, "--out", str(tmp_path / "x"), "--on-error", "fail"]) == 2
    assert "--label-key none" in capsys.readouterr().err
    assert main([*base, "--label-key", "none", "--out", str(tmp_path / "a")]) == 0
    assert "seen 60  scored 60  errored 0  kept 30" in capsys.readouterr().out
    cfg = tmp_path / "u.toml"
    cfg.write_text('label-key = "none"\n')
    assert main([*base, "--config", str(cfg), "--out", str(tmp_path / "b")]) == 0
    a, b = (pq.read_table(tmp_path / o / "selection.parquet") for o in "ab")
    assert a.equals(b) and set(a.column("label").to_pylist()) == {0}


def test_predicted_labels_are_the_models_argmax(unlabeled, tmp_path, capsys):
    import torch
    from tiny import mlp

    url, ckpt, y = unlabeled
    out = tmp_path / "p"
    argv = ["run", url, "--model", "tiny:mlp", "--checkpoint", ckpt, "--label-key", "predicted",
            "--keep", "0.5", "--out", str(out), *COMMON]  # fmt: skip
    assert main(argv) == 0
    scores = pq.read_table(out / "scores").sort_by("__key__").to_pylist()
    model = mlp()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    from tiny import blobs

    x, _, _ = blobs(60, flip=0.0)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(1).tolist()
    assert [r["label"] for r in scores] == predicted
    assert len(set(predicted)) == 3  # three classes, three consensus directions
    # the training feed gives the labels the run used
    from sage_stream.feed import SelectedDataset

    kept = {r["__key__"]: r["label"] for r in pq.read_table(out / "selection.parquet").to_pylist()}
    fed = sorted(label for _x, label, _score in SelectedDataset(str(out)))
    assert fed == sorted(kept.values())
