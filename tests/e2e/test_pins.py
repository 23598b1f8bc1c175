"""Pinned inputs (issue 15, "Trust at scale", case 3): the shards a run scored are the shards it
emits. Each shard's size and mtime (local) or ETag (S3) is recorded when the inputs are listed
(the run identity's `pins`); every later open checks it, so a shard rewritten between score
and emit is an error naming it, never output with stale scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import blobs, train_checkpoint, write_parquet_set, write_tar_set

import sage_stream
from sage_stream.errors import MismatchError, ShardError

PASS = dict(model="tiny:mlp", ell=8, batch_size=32, device="cpu", progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pins")
    x, _, noisy = blobs(120)
    return root, x, noisy, train_checkpoint(root / "proxy.pt", x, noisy)


def scored(urls, ckpt: str, out: Path, **fields) -> None:
    sage_stream.sketch(urls, out=str(out), checkpoint=ckpt, **PASS, **fields)
    sage_stream.score(urls, out=str(out), checkpoint=ckpt, **PASS, **fields)
    sage_stream.select(out=str(out), keep=0.5)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_a_shard_rewritten_between_score_and_emit_is_an_error_naming_it(data, tmp_path, fmt):
    root, x, noisy, ckpt = data
    write = write_tar_set if fmt == "tar" else write_parquet_set
    fields = {} if fmt == "tar" else {"input_key": "features", "label_key": "label"}
    urls = write(tmp_path / "in", x, noisy)
    out = tmp_path / "out"
    scored(urls, ckpt, out, **fields)
    write(tmp_path / "in", x, (noisy + 1) % 3)  # same keys, other labels: every pin changes
    with pytest.raises(ShardError, match=rf"part-000\.{fmt}: changed since the inputs were listed"):
        sage_stream.emit(urls, out=str(out))
    assert not (out / "_SUCCESS").exists()
    said = rf"other contents of these inputs: 3 shard\(s\) changed since: part-000\.{fmt} \(size="
    with pytest.raises(MismatchError, match=said):
        sage_stream.run(urls, out=str(out), checkpoint=ckpt, keep=0.5, **PASS, **fields)
    # --overwrite scores the new contents
    sage_stream.run(urls, out=str(out), checkpoint=ckpt, keep=0.5, overwrite=True, **PASS,
                    **fields)  # fmt: skip
    assert (out / "_SUCCESS").exists()


def test_the_pin_is_recorded_in_the_manifest(data, tmp_path):
    root, x, noisy, ckpt = data
    urls = write_tar_set(tmp_path / "in", x, noisy)
    out = tmp_path / "out"
    sage_stream.run(urls, out=str(out), checkpoint=ckpt, keep=0.5, **PASS)
    identity = json.loads((out / "manifest.json").read_text())["identity"]
    assert len(identity["pins"]) == len(urls)
    for url, pin in zip(urls, identity["pins"], strict=True):
        stat = Path(url).stat()
        assert pin == f"size={stat.st_size} mtime={stat.st_mtime}"


def test_a_shard_rewritten_on_s3_between_score_and_emit_is_an_error(data, s3_bucket):
    """Rewritten by another client (boto3): s3fs's cached listing must not hide it."""
    boto3 = pytest.importorskip("boto3")
    root, x, noisy, ckpt = data
    local = write_tar_set(root / "s3in", x, noisy)
    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for url in local:
        client.put_object(Bucket=bucket, Key=f"in/{Path(url).name}", Body=Path(url).read_bytes())
    out = f"{s3_bucket}/out"
    sage_stream.sketch(f"{s3_bucket}/in", out=out, checkpoint=ckpt, **PASS)
    sage_stream.score(f"{s3_bucket}/in", out=out, checkpoint=ckpt, **PASS)
    sage_stream.select(out=out, keep=0.5)
    rewritten = write_tar_set(root / "s3in2", x, np.asarray((noisy + 1) % 3))
    client.put_object(Bucket=bucket, Key="in/part-001.tar", Body=Path(rewritten[1]).read_bytes())
    said = r"in/part-001\.tar: changed since the inputs were listed \(size=\d+ etag="
    with pytest.raises(ShardError, match=said):
        sage_stream.emit(f"{s3_bucket}/in", out=out)
