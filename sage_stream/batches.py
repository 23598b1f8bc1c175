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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import SampleError, ShardError
from .sample import Sample

Decoder = Callable[[Sample], tuple[Tensor, int]]
HELD_BATCHES = 4  # samples waiting across shapes: at most this many batches' worth


@dataclass
class Batch:
    keys: list[str]
    indices: list[int]  # positions in the shard
    x: Tensor  # (B, ...) float32, on the CPU
    y: Tensor  # (B,) int64


@dataclass
class Skipped:
    key: str
    index: int
    reason: str
    label: int | None = None


def _decode(sample: Sample, decoder: Decoder, num_classes: int) -> tuple[Tensor, int]:
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
    x = torch.as_tensor(x, dtype=torch.float32)
    return x, label


class _Pending:
    """The batch being filled: samples of one input shape, in stream order."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.indices: list[int] = []
        self.xs: list[Tensor] = []
        self.ys: list[int] = []

    def add(self, sample: Sample, x: Tensor, y: int) -> None:
        self.keys.append(sample.key)
        self.indices.append(sample.index)
        self.xs.append(x)
        self.ys.append(y)

    def take(self) -> Batch:
        batch = Batch(self.keys, self.indices, torch.stack(self.xs), torch.tensor(self.ys))
        self.keys, self.indices, self.xs, self.ys = [], [], [], []
        return batch


class _Groups:
    """Pending batches by input shape, in the order their first sample arrived."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.by_shape: dict[tuple[int, ...], _Pending] = {}  # insertion order = arrival order
        self.held = 0

    def add(self, sample: Sample, x: Tensor, y: int) -> Iterator[Batch]:
        shape = tuple(x.shape)
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

    def _take(self, shape: tuple[int, ...]) -> Batch:
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
