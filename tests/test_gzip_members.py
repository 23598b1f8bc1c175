"""Gzipped members decompressed as webdataset does, in bounded memory (issue 26.5)."""

from __future__ import annotations

import gzip
import pickle
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardmaker import make_tar_shard, npy_bytes
from tiny import blobs, key

from sage_stream.cli import main
from sage_stream.decode.decoder import make_decoder
from sage_stream.errors import SampleError
from sage_stream.gzip_members import gunzip, gunzip_fields
from sage_stream.sample import Sample

COMMON = ["--device", "cpu", "--no-progress", "--ell", "8", "--loader-workers", "0"]


def zeros_gzip(n: int) -> bytes:
    """gzip of n zero bytes, made in pieces (a bomb: about n / 1000 bytes)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(n >> 20)]
    return b"".join(parts) + packer.flush()


def test_gunzip_reads_members_one_after_another_and_refuses_what_is_not_gzip():
    assert gunzip(gzip.compress(b"ab") + gzip.compress(b"cd") + b"\0\0", 10) == b"abcd"
    with pytest.raises(ValueError, match="not gzip"):
        gunzip(b"plain", 10)
    with pytest.raises(ValueError, match="truncated"):
        gunzip(gzip.compress(b"abcdef" * 100)[:-12], 10_000)


def test_a_gzip_bomb_stops_at_the_cap_in_bounded_memory():
    bomb = zeros_gzip(256 << 20)  # 256 MiB of zeros in about 250 KB
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    with pytest.raises(ValueError, match="more than 1048576 bytes"):
        gunzip(bomb, 1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20  # the cap and a chunk or two, never the 256 MiB


def test_gz_fields_get_their_plain_names_too():
    array = np.arange(6, dtype=np.float32)
    raw = Sample("k", "s.tar", {"npy.gz": gzip.compress(npy_bytes(array)), "cls": b"1"})
    sample = gunzip_fields(raw, 1 << 20)
    assert sample.fields["npy"] == sample.fields["npy.gz"] == npy_bytes(array)
    assert raw.fields["npy.gz"] != npy_bytes(array)  # the sample as read is left alone
    x, y = make_decoder()(raw)
    assert x.tolist() == array.tolist() and y == 1
    x, _ = make_decoder(input_key="npy.gz")(raw)  # webdataset's name for it works too
    assert x.tolist() == array.tolist()
    both = Sample(
        "k", "s.tar", {"cls": b"2", "cls.gz": gzip.compress(b"1"), "npy": npy_bytes(array)}
    )
    assert make_decoder()(both)[1] == 2  # a plain field of that name wins
    decoder = pickle.loads(pickle.dumps(make_decoder(max_member_bytes=16)))
    with pytest.raises(SampleError, match="cannot decompress 'npy.gz'.*max-member-bytes"):
        decoder(raw)  # the cap travels to the loader's processes


def test_txt_gz_is_tokenized(tmp_path):
    pytest.importorskip("tokenizers")
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from examples.text_job import make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    decoder = make_decoder(tokenizer=tokenizer, input_key="txt", label_key="cls")
    x, y = decoder(Sample("k", "s.tar", {"txt.gz": gzip.compress(b"the bus"), "cls": b"2"}))
    assert len(x["input_ids"]) == 4 and y == 2


def test_a_run_scores_gzipped_members_and_makes_a_bomb_an_error_row(tmp_path, capsys):
    x, _, noisy = blobs(60)
    samples = {key(i): {"npy.gz": gzip.compress(npy_bytes(x[i])),
                        "cls.gz": gzip.compress(str(int(noisy[i])).encode())}
               for i in range(60)}  # fmt: skip
    samples["zz-bomb"] = {"npy.gz": zeros_gzip(64 << 20), "cls": b"0"}
    shard = make_tar_shard(tmp_path / "gz.tar", samples)
    out = tmp_path / "o"
    argv = ["run", shard, "--model", "tiny:mlp", "--keep", "0.5", "--out", str(out),
            "--max-member-bytes", "1MiB", *COMMON]  # fmt: skip
    assert main(argv) == 0
    scores = pq.read_table(out / "scores" / "part-gz.tar.parquet").to_pylist()
    ok = [r for r in scores if r["status"] == "ok"]
    assert len(ok) == 60  # before: every sample an error ("no input member")
    (bomb,) = [r for r in scores if r["status"] == "error"]
    assert bomb["__key__"] == "zz-bomb" and "more than 1048576 bytes" in bomb["reason"]
