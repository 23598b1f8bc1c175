"""decode → batch: model-ready batches in stream order, a Skipped record per unusable sample."""

from __future__ import annotations

import pytest
import torch

from sage_stream.decode.batches import Batch, Skipped, decoded_batches
from sage_stream.errors import SampleError, ShardError
from sage_stream.sample import Sample


def decoder(sample: Sample):
    if sample.fields.get("bad"):
        raise SampleError(sample.shard, sample.key, "cannot decode")
    return torch.full(sample.fields.get("shape", (2,)), float(sample.index)), sample.fields["y"]


def samples(n: int, special: dict[int, dict] | None = None) -> list[Sample]:
    out = []
    for i in range(n):
        fields = {"y": i % 3, **(special or {}).get(i, {})}
        out.append(Sample(f"k{i}", "s.tar", fields, index=i))
    return out


def kinds(items) -> list[str]:
    return [f"B{len(i.keys)}" if isinstance(i, Batch) else f"S:{i.key}" for i in items]


def test_batches_of_batch_size_in_order():
    items = list(decoded_batches(samples(7), decoder, batch_size=3, num_classes=3))
    assert kinds(items) == ["B3", "B3", "B1"]
    assert items[0].keys == ["k0", "k1", "k2"] and items[0].indices == [0, 1, 2]
    assert items[0].x.dtype == torch.float32 and items[0].x.shape == (3, 2)
    assert items[1].y.tolist() == [0, 1, 2]


def test_bad_samples_become_skips_in_stream_order():
    stream = samples(5, {1: {"bad": True}, 3: {"y": 7}})
    stream[4].error = "reader: repeated field"
    items = list(decoded_batches(stream, decoder, batch_size=8, num_classes=3))
    assert kinds(items) == ["S:k1", "S:k3", "S:k4", "B2"]
    assert items[1].reason == "label 7 outside [0, 3)"
    assert items[2].reason == "reader: repeated field"


def test_shapes_are_batched_apart_in_the_order_they_first_came():
    stream = samples(4, {2: {"shape": (3,)}})
    items = list(decoded_batches(stream, decoder, batch_size=8, num_classes=3))
    assert kinds(items) == ["B3", "B1"]
    assert items[0].keys == ["k0", "k1", "k3"] and items[1].keys == ["k2"]


def test_alternating_shapes_still_fill_whole_batches():
    # two image sizes taking turns: before grouping, every sample was a batch of its own
    stream = samples(16, {i: {"shape": (3,)} for i in range(1, 16, 2)})
    items = list(decoded_batches(stream, decoder, batch_size=4, num_classes=3))
    assert kinds(items) == ["B4"] * 4
    assert sorted(k for b in items for k in b.keys) == sorted(f"k{i}" for i in range(16))
    assert all(len({tuple(x.shape) for x in b.x}) == 1 for b in items)


def test_samples_held_across_shapes_are_bounded():
    # every sample a new shape: no batch can fill, so the oldest group goes out once
    # HELD_BATCHES batches' worth wait, and nothing is lost
    stream = samples(30, {i: {"shape": (i + 1,)} for i in range(30)})
    items = list(decoded_batches(stream, decoder, batch_size=2, num_classes=3))
    assert kinds(items) == ["B1"] * 30
    assert [b.keys[0] for b in items] == [f"k{i}" for i in range(30)]


def test_a_broken_stream_flushes_every_shape_before_the_error():
    def stream():
        yield from samples(3, {1: {"shape": (5,)}})
        raise ShardError("s.tar", "truncated")

    got = []
    with pytest.raises(ShardError, match="truncated"):
        for item in decoded_batches(stream(), decoder, batch_size=8, num_classes=3):
            got.append(item)
    assert kinds(got) == ["B2", "B1"]


def test_a_user_preprocess_error_is_this_samples_skip():
    def broken(sample):
        raise KeyError("nope")

    items = list(decoded_batches(samples(1), broken, batch_size=2, num_classes=3))
    assert isinstance(items[0], Skipped) and "preprocess failed" in items[0].reason


def test_a_broken_stream_yields_the_complete_samples_first():
    def stream():
        yield from samples(3)
        raise ShardError("s.tar", "truncated")

    got = []
    with pytest.raises(ShardError, match="truncated"):
        for item in decoded_batches(stream(), decoder, batch_size=8, num_classes=3):
            got.append(item)
    assert kinds(got) == ["B3"]


def _digest_by_byte_view(x, label: int) -> int:
    """content_digest's definition, spelled out: label, then per field its header and bytes."""
    import hashlib

    h = hashlib.sha256(str(label).encode())
    for name, t in sorted(x.items()) if isinstance(x, dict) else [("", x)]:
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


@pytest.mark.parametrize(
    "x",
    [
        torch.arange(32, dtype=torch.float32),
        torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
        torch.arange(24, dtype=torch.float32).reshape(4, 6).T,  # strided: the copy path
        torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2],
        torch.zeros(0, 3),
        torch.arange(5, dtype=torch.float32).bfloat16(),  # no numpy dtype: the byte view
        torch.arange(5, dtype=torch.float32).half(),
        torch.tensor([True, False, True]),
        torch.tensor(3.5),
        torch.arange(6, dtype=torch.float32).requires_grad_(),
        {"input_ids": torch.arange(9), "attention_mask": torch.ones(9, dtype=torch.int32)},
    ],
    ids=lambda x: "dict" if isinstance(x, dict) else f"{x.dtype}-{tuple(x.shape)}",
)
def test_content_digest_hashes_the_values_in_memory_order_whatever_the_layout(x):
    from sage_stream.decode.batches import content_digest

    assert content_digest(x, 7) == _digest_by_byte_view(x, 7)
    assert content_digest(x, 7) != content_digest(x, 6)  # the label is part of the content
