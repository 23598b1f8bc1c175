"""Untrusted shards and odd inputs in whole runs (issue 25): one bad shard never stops the set.

1. and 2. Hostile tar headers (a claimed size far beyond the stream, an oversized GNU long
   name inside gzip) end their shard or sample with a recorded reason, and the other shards
   are scored and emitted.
4. A Parquet shard whose feature column is nested one level deeper than the others' gives
   error rows naming both shapes; the other shards are scored.
7. and 8. A folder named like a pattern (`in pút [1]`) is read as that folder; a key made
   only of a symlink or a folder is an error row (seen = scored + errored counts every key);
   a --keep that keeps nothing says so.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile

import pyarrow.parquet as pq
import pytest
from hostile_tars import END, gzip_bytes, long_name, pax, pax_record, sample
from shardmaker import make_parquet_shard
from tiny import blobs, key, train_checkpoint, write_parquet_set, write_tar_set

import sage_stream

OPTIONS = dict(model="tiny:mlp", ell=8, batch_size=32, device="cpu", keep=0.5, progress=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    x, _, noisy = blobs(90)
    return train_checkpoint(root / "proxy.pt", x, noisy)


def score_rows(out) -> dict[str, dict]:
    rows = {}
    for part in sorted((out / "scores").glob("part-*.parquet")):
        rows.update({r["__key__"]: r for r in pq.read_table(part).to_pylist()})
    return rows


def test_hostile_headers_are_recorded_and_the_other_shards_go_on(tmp_path, ckpt):
    x, _, noisy = blobs(90)
    write_tar_set(tmp_path / "in", x, noisy)
    claim = sample("c0") + pax(pax_record("size", str(10**12))) + sample("c1")[:512] + b"x" * 9000
    (tmp_path / "in" / "claim.tar").write_bytes(claim)
    name = sample("n0") + long_name(b"n" * (2**20 + 1)) + sample("n1") + sample("n2") + END
    (tmp_path / "in" / "name.tar.gz").write_bytes(gzip_bytes(name))
    out = tmp_path / "out"
    sage_stream.run(str(tmp_path / "in"), out=str(out), checkpoint=ckpt, **OPTIONS)
    manifest = json.loads((out / "manifest.json").read_text())
    (error,) = manifest["shard_errors"]
    assert error["name"] == "claim.tar" and "claims" in error["shard_error"], error
    rows = score_rows(out)
    assert rows["n1"]["status"] == "error" and "over the limit" in rows["n1"]["reason"]
    assert rows["n0"]["status"] == rows["n2"]["status"] == "ok"
    totals = manifest["totals"]
    assert totals["seen"] == 90 + 1 + 3 == totals["scored"] + totals["errored"]
    assert (out / "_SUCCESS").exists()


def test_a_parquet_shard_nested_deeper_is_error_rows_and_the_others_go_on(tmp_path, ckpt):
    x, _, noisy = blobs(90)
    write_parquet_set(tmp_path / "in", x, noisy)
    odd = {"__key__": [f"z{i}" for i in range(20)], "features": [[x[i].tolist()] for i in range(20)],
           "label": [int(noisy[i]) for i in range(20)], "note": ["odd"] * 20}  # fmt: skip
    make_parquet_shard(tmp_path / "in" / "part-001-b.parquet", odd)
    out = tmp_path / "out"
    options = {**OPTIONS, "input_key": "features", "label_key": "label"}
    sage_stream.run(str(tmp_path / "in"), out=str(out), checkpoint=ckpt, **options)
    rows = score_rows(out)
    odd_rows = [rows[f"z{i}"] for i in range(20)]
    assert all(r["status"] == "error" for r in odd_rows)
    reason = odd_rows[0]["reason"]
    assert "(1, 8)" in reason and "inputs of shape (8,) fit" in reason, reason
    assert all(rows[key(i)]["status"] == "ok" for i in range(90))
    assert (out / "_SUCCESS").exists()


def test_odd_keys_are_counted_and_an_empty_selection_warns(tmp_path, ckpt, caplog):
    x, _, noisy = blobs(90)
    folder = tmp_path / "in pút [1]"  # exists: a folder, not a glob that matches nothing
    write_tar_set(folder, x, noisy)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind in [("only-link.npy", tarfile.SYMTYPE), ("only-dir.npy", tarfile.DIRTYPE)]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tf.addfile(info)
    (folder / "links.tar").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    options = {**OPTIONS, "keep": 1e-9}
    with caplog.at_level(logging.WARNING, logger="sage_stream"):
        sage_stream.run(str(folder), out=str(out), checkpoint=ckpt, **options)
    rows = score_rows(out)
    assert rows["only-link"]["reason"] == "no regular file among its members (only a symlink)"
    assert rows["only-dir"]["status"] == "error"
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    assert totals["seen"] == 92 == totals["scored"] + totals["errored"]
    assert totals["kept"] == 0
    assert "the selection keeps 0 of 90 scored samples (--keep 1e-09)" in caplog.text
