"""decode → batch: turns a shard's stream of Samples into model-ready batches.

A sample that cannot be used (a reader's error, a decode failure, a missing or out-of-range
label, an input of another shape) becomes a `Skipped` record in the same stream, in order, so
that pass 2 can write it to scores/ with its reason. What to do about it (`--on-error`) is
decided by the shard loop (`passes.loop`), not here.

Samples of differing input shapes (native-size images, no --crop) cannot share a batch. They
are grouped by shape: each shape fills its own batch, so a shard that alternates between a few
sizes still runs in full batches. At most `HELD_BATCHES` batches' worth of samples wait across
all shapes (bounded memory); past that, the group that started first is sent as it is. With
one shape this is exactly one batch after another, in stream order.

An input is a tensor or a dict of tensors (`input_ids`, `attention_mask`, ... from a
preprocess or `--tokenizer`); a dict batch is a dict of stacked tensors, and the model is
called as `model(**x)`. In a dict, 1-D integer or bool tensors are sequences: samples of any
length share a batch, padded with 0 to the longest (BERT's pad id; the attention mask's 0).
Dtypes: floating inputs become float32 (as always); int32/int64 and bool stay as they are
(token ids must reach `nn.Embedding` as integers); anything else (uint8 images) float32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..errors import SampleError, ShardError
from ..sample import Sample

Inputs = Tensor | dict[str, Tensor]
Decoder = Callable[[Sample], tuple[Any, int]]
KEPT_DTYPES = (torch.int64, torch.int32, torch.bool)
HELD_BATCHES = 4  # samples waiting across shapes: at most this many batches' worth


@dataclass
class Batch:
    keys: list[str]
    indices: list[int]  # positions in the shard
    x: Inputs  # (B, ...) float32 (or kept integer dtype), or a dict of them; on the CPU
    y: Tensor  # (B,) int64
    digests: list[int] = field(default_factory=list)  # content_digest of each sample


@dataclass
class Skipped:
    key: str
    index: int
    reason: str
    label: int | None = None


def as_input(x: Any) -> Inputs:
    """A decoded input as a tensor, or a dict of tensors, in the dtypes the module docstring
    gives; TypeError/ValueError for anything else."""
    if isinstance(x, Mapping):
        if not x:
            raise ValueError("the input is an empty dict")
        return {str(k): _as_tensor(v) for k, v in x.items()}
    return _as_tensor(x)


def _as_tensor(x: Any) -> Tensor:
    t = torch.as_tensor(x)
    return t if t.dtype in KEPT_DTYPES else t.to(torch.float32)


def _is_sequence(t: Tensor) -> bool:
    return t.ndim == 1 and (t.dtype in KEPT_DTYPES)


def group_key(x: Inputs) -> tuple:
    """What samples must share to be in one batch: the shape and dtype, per key for a dict
    (a sequence's length is padded away, so it is not part of it)."""
    if isinstance(x, Tensor):
        return tuple(x.shape)
    return tuple(
        (k, v.dtype, "seq" if _is_sequence(v) else tuple(v.shape)) for k, v in sorted(x.items())
    )


def input_shape(x: Inputs) -> Any:
    """A sample's (or a batch's per-sample) shape for messages: (C, H, W) or {key: shape}."""
    if isinstance(x, Tensor):
        return tuple(x.shape)
    return {k: tuple(v.shape) for k, v in x.items()}


def collate(xs: list[Inputs]) -> Inputs:
    """Stack samples of one group key; pad a dict's sequences with 0 to the longest."""
    first = xs[0]
    if isinstance(first, Tensor):
        return torch.stack(xs)  # type: ignore[arg-type]
    out: dict[str, Tensor] = {}
    for k, v in first.items():
        column = [x[k] for x in xs]  # type: ignore[index]
        if _is_sequence(v):
            longest = max(t.shape[0] for t in column)
            padded = v.new_zeros((len(column), longest))
            for i, t in enumerate(column):
                padded[i, : t.shape[0]] = t
            out[k] = padded
        else:
            out[k] = torch.stack(column)
    return out


def to_device(x: Inputs, device: torch.device) -> Inputs:
    """On the model's device; from pinned memory on CUDA, so the copies are asynchronous."""

    def move(t: Tensor) -> Tensor:
        if device.type == "cuda":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return move(x) if isinstance(x, Tensor) else {k: move(v) for k, v in x.items()}


def content_digest(x: Inputs, label: int) -> int:
    """A signed 64-bit digest of what the model is given for a sample: its decoded input
    (dtype, shape and values, before any padding; a dict by sorted key) and its label.

    "The same content" is defined here, after decoding, so that one sample gives one digest
    whether it came from a tar member or a Parquet cell, under any key, in any shard: a PNG
    in a tar and the same PNG bytes in a Parquet column decode to the same tensor. Pass 1's
    groups start at samples picked by it (passes/groups.py), pass 2 records it in scores/,
    and the random draws are seeded by it. SHA-256 (hardware-accelerated on current CPUs,
    ~0.7 ms per 600 KB image tensor) cut to 8 bytes.
    """
    h = hashlib.sha256(str(int(label)).encode())
    items = sorted(x.items()) if isinstance(x, dict) else [("", x)]
    for name, t in items:
        h.update(_field_header(name, t.dtype, tuple(t.shape)))
        h.update(_raw_bytes(t))
    return int.from_bytes(h.digest()[:8], "little", signed=True)


@lru_cache(maxsize=256)
def _field_header(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """What `content_digest` hashes before a tensor's bytes: a few shapes recur in a stream."""
    return f"|{name}|{dtype}|{shape}|".encode()


def _raw_bytes(t: Tensor) -> Any:
    """A tensor's values in memory order, as a buffer for hashlib.

    A contiguous CPU tensor numpy can view (the usual decoded input) is hashed in place,
    without the reshape/view/copy chain (half of the digest's cost on small inputs); any other
    (bfloat16, on a device, strided, autograd) goes through the byte view, with the same bytes.
    """
    if t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad:
        try:
            return t.numpy()
        except (TypeError, RuntimeError):  # a dtype numpy lacks; a conjugate or negative bit
            pass
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def _decode(sample: Sample, decoder: Decoder, num_classes: int) -> tuple[Inputs, int]:
    if sample.error is not None:
        raise SampleError(sample.shard, sample.key, sample.error)
    try:
        x, label = decoder(sample)
    except SampleError:
        raise
    except Exception as exc:  # a user preprocess may raise anything; it is about this sample
        raise SampleError(sample.shard, sample.key, f"preprocess failed: {exc}") from None
    label = int(label)
    if not 0 <= label < num_classes:
        raise SampleError(sample.shard, sample.key, f"label {label} outside [0, {num_classes})")
    try:
        x = as_input(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SampleError(sample.shard, sample.key, f"not a tensor input: {exc}") from None
    return x, label


class _Pending:
    """The batch being filled: samples of one input shape, in stream order."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.indices: list[int] = []
        self.xs: list[Inputs] = []
        self.ys: list[int] = []
        self.digests: list[int] = []

    def add(self, sample: Sample, x: Inputs, y: int) -> None:
        self.keys.append(sample.key)
        self.indices.append(sample.index)
        self.xs.append(x)
        self.ys.append(y)
        self.digests.append(content_digest(x, y))

    def take(self) -> Batch:
        x, y = collate(self.xs), torch.tensor(self.ys)
        batch = Batch(self.keys, self.indices, x, y, self.digests)
        self.keys, self.indices, self.xs, self.ys, self.digests = [], [], [], [], []
        return batch


class _Groups:
    """Pending batches by input shape, in the order their first sample arrived."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.by_shape: dict[tuple, _Pending] = {}  # insertion order = arrival order
        self.held = 0

    def add(self, sample: Sample, x: Inputs, y: int) -> Iterator[Batch]:
        shape = group_key(x)
        group = self.by_shape.setdefault(shape, _Pending())
        group.add(sample, x, y)
        self.held += 1
        if len(group.keys) == self.batch_size:
            yield self._take(shape)
        elif self.held > HELD_BATCHES * self.batch_size:
            yield self._take(next(iter(self.by_shape)))  # the oldest group, as it is

    def flush(self) -> Iterator[Batch]:
        while self.by_shape:
            yield self._take(next(iter(self.by_shape)))

    def _take(self, shape: tuple) -> Batch:
        batch = self.by_shape.pop(shape).take()
        self.held -= len(batch.keys)
        return batch


def decoded_batches(
    samples: Iterable[Sample],
    decoder: Decoder,
    *,
    batch_size: int,
    num_classes: int,
) -> Iterator[Batch | Skipped]:
    """Batches of up to `batch_size` decoded samples of one shape, and a `Skipped` for every
    unusable one.

    If the stream itself breaks (a truncated shard), the complete samples before the break are
    still yielded (the last batches), and then the reader's error is raised.
    """
    groups = _Groups(batch_size)
    try:
        for sample in samples:
            try:
                x, y = _decode(sample, decoder, num_classes)
            except SampleError as exc:
                yield Skipped(sample.key, sample.index, exc.reason)
                continue
            yield from groups.add(sample, x, y)
    except ShardError:
        yield from groups.flush()
        raise
    yield from groups.flush()
