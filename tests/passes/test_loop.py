"""The one shard loop: Featured / Skipped / Broken items, and --on-error applied once."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from shardmaker import npy_bytes, tar_bytes, write_bytes
from tiny import DIM, mlp

from sage_stream.config import make_config
from sage_stream.decode.batches import Skipped
from sage_stream.errors import SampleError, ShardError
from sage_stream.passes.loop import Broken, Featured, build_context, shard_items
from sage_stream.progress import Progress


def vector(i: int, dim: int = DIM, value: float | None = None) -> bytes:
    x = np.full(dim, i / 10 if value is None else value, dtype=np.float32)
    return npy_bytes(x)


SAMPLES = [
    ("a0", {"npy": vector(0), "cls": b"0"}),
    ("a1", {"npy": b"not an npy", "cls": b"1"}),  # undecodable
    ("a2", {"npy": vector(2), "cls": b"2"}),
    ("a3", {"npy": vector(3, dim=DIM + 1), "cls": b"0"}),  # a shape the model refuses
    ("a4", {"npy": vector(4, value=float("nan")), "cls": b"1"}),  # non-finite loss
]


def context(url: str, on_error: str):
    cfg = make_config(inputs=[url], out="memory://unused", model=mlp, device="cpu",
                      batch_size=2, on_error=on_error, progress=False)  # fmt: skip
    return build_context(cfg)


def items_of(ctx, progress=None):
    progress = progress or Progress("test", 1, False)
    return list(shard_items(ctx, ctx.refs[0], progress)), progress


def test_skip_records_every_problem_in_shard_order(mem_url):
    url = write_bytes(f"{mem_url}/s.tar", tar_bytes(SAMPLES))
    items, progress = items_of(context(url, "skip"))
    shape = [(type(i).__name__, getattr(i, "key", None) or getattr(i, "batch", None) and i.batch.keys)
             for i in items]  # fmt: skip
    assert shape == [("Skipped", "a1"), ("Featured", ["a0", "a2"]), ("Skipped", "a3"),
                     ("Featured", ["a4"])]  # fmt: skip
    refused = items[2]
    assert "cannot take this input of shape (9,)" in refused.reason and refused.label == 0
    assert items[3].usable.tolist() == [False]  # kept as a row; pass 1 leaves it out
    assert items[1].usable.tolist() == [True, True]
    assert progress.samples == 5


@pytest.mark.parametrize(
    ("drop", "key", "reason"),
    [((), "a1", "cannot decode"), (("a1",), "a3", "cannot take this input"),
     (("a1", "a3"), "a4", "non-finite loss")],
)  # fmt: skip
def test_fail_raises_at_the_first_problem_naming_url_and_key(mem_url, drop, key, reason):
    kept = [s for s in SAMPLES if s[0] not in drop]
    url = write_bytes(f"{mem_url}/s.tar", tar_bytes(kept))
    with pytest.raises(SampleError, match=reason) as raised:
        items_of(context(url, "fail"))
    assert raised.value.key == key and raised.value.url.endswith("/s.tar")


def test_a_broken_stream_is_a_last_record_or_raises(mem_url):
    data = tar_bytes([SAMPLES[0], SAMPLES[2]])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        cut = tf.getmember("a2.npy").offset_data + 10  # inside the second sample
    url = write_bytes(f"{mem_url}/cut.tar", data[:cut])
    items, _ = items_of(context(url, "skip"))
    assert [type(i) for i in items] == [Featured, Broken]
    assert items[0].batch.keys == ["a0"] and "truncated" in items[1].reason
    with pytest.raises(ShardError, match="cut.tar"):
        items_of(context(url, "fail"))


def test_skipped_items_keep_their_positions(mem_url):
    url = write_bytes(f"{mem_url}/s.tar", tar_bytes(SAMPLES))
    items, _ = items_of(context(url, "skip"))
    skipped = [i for i in items if isinstance(i, Skipped)]
    assert [(s.key, s.index) for s in skipped] == [("a1", 1), ("a3", 3)]
