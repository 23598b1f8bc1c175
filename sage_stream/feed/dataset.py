"""`SelectedDataset`: the kept samples as a torch IterableDataset, split over nodes and
DataLoader workers so that every kept sample comes out exactly once per epoch."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..decode.decoder import make_decoder
from ..decode.images import image_transform
from ..errors import InputError, SageError, ShardError
from ..sample import Sample
from .plan import ON_ERROR, FeedShard, plan_feed
from .stages import ranked_score, shard_samples

log = logging.getLogger("sage_stream")


class DecodeScored:
    """Default decode: sample dict -> ``(x, label, score)`` with the run's input/label keys.

    ``x`` is the float tensor of the built-in decoders (or of ``preprocess``), ``label`` an int,
    ``score`` the ``ranked_score`` of the sample's record. Picklable, for spawned workers.
    """

    def __init__(self, **decoder_options: Any) -> None:
        self.predicted = decoder_options.get("label_key") == "predicted"
        self.decoder = make_decoder(**decoder_options)

    def __call__(self, sample: Mapping[str, Any]) -> tuple[torch.Tensor, int, float]:
        fields = {k: v for k, v in sample.items() if not k.startswith("__") and k != "sage"}
        x, label = self.decoder(Sample(sample["__key__"], sample["__shard__"], fields))
        if self.predicted:  # the run's labels were the model's predictions: its record has them
            label = int(sample["sage"]["label"])
        return x, label, ranked_score(sample["sage"])


def node_of(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else from torch.distributed if initialised, else (0, 1)."""
    if rank is None and world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise InputError("give both rank and world_size, or neither")
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def assigned(items: Sequence[Any], rank: int, world_size: int, worker: int, workers: int) -> list:
    """The items of one DataLoader worker on one node: every ``world_size · workers``-th,
    starting at ``rank · workers + worker``; together the parts are ``items``, each once."""
    return list(items[rank * workers + worker :: world_size * workers])


class SelectedDataset(IterableDataset):
    """The kept samples of run ``out`` as a PyTorch IterableDataset, decoded for training.

    Reads the emitted shards, or with ``original=True`` / ``inputs`` the input shards filtered
    by ``OUT/selection.parquet``. Each item is ``transform(decode(sample))``; the default
    ``decode`` gives ``(x, label, score)`` with the run's ``input_key``/``label_key`` (see
    ``DecodeScored``). Shards are split over nodes (``rank``/``world_size``, else
    torch.distributed when initialised at construction) and DataLoader workers, so each kept
    sample comes once per epoch across all of them; a worker with no shard yields nothing, so
    nodes may get unequal counts. ``shuffle`` permutes the shard order per epoch
    (``set_epoch``), the same on every node and worker. ``shuffle_buffer=N`` also shuffles
    samples, through a buffer of N per DataLoader worker (webdataset's ``shuffle(N)``; seeded
    by seed, epoch, rank and worker, so an epoch is reproducible). ``equal_per_rank=True``
    makes every rank yield exactly ``num_samples // world_size`` samples per epoch, split
    evenly over its DataLoader workers, as webdataset's ``with_epoch`` does: a rank whose
    shards hold fewer starts over on them, one with more stops early, so distributed training
    never waits at the end of an epoch for a rank that has run out (each sample then comes at
    most twice or not at all in that epoch, not exactly once). ``on_error="skip"`` logs and skips an
    undecodable sample or the rest of a broken shard instead of raising.
    """

    def __init__(
        self,
        out: str,
        *,
        original: bool = False,
        inputs: str | Sequence[str] | None = None,
        decode: Callable[[dict[str, Any]], Any] | None = None,
        transform: Callable[[Any], Any] | None = None,
        input_key: str | None = None,
        label_key: str | None = None,
        preprocess: Any = None,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        equal_per_rank: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: str = "raise",
        storage_options: dict | None = None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise InputError(f"on_error {on_error!r}: choose one of {', '.join(ON_ERROR)}")
        self.plan = plan_feed(
            out, original=original, inputs=inputs, storage_options=storage_options
        )
        self.decode = decode or self._default_decode(input_key, label_key, preprocess)
        self.transform = transform
        if shuffle_buffer < 0:
            raise InputError(f"shuffle_buffer must be 0 (off) or more, got {shuffle_buffer}")
        if equal_per_rank and self.plan.num_samples is None:
            raise InputError(
                "equal_per_rank needs the kept counts per shard, which this run did not record"
            )
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.shuffle_buffer, self.equal_per_rank = shuffle_buffer, equal_per_rank
        self.rank, self.world_size = node_of(rank, world_size)
        self.on_error = on_error
        self.storage_options = storage_options

    def _default_decode(self, input_key, label_key, preprocess) -> DecodeScored:  # noqa: ANN001
        config = self.plan.config
        if preprocess is None and config.get("preprocess") is not None:
            raise InputError(
                f"the run decoded its samples with preprocess {config['preprocess']!r}: pass "
                "preprocess= (module:function) or decode= to decode them the same way"
            )
        return DecodeScored(
            input_key=input_key if input_key is not None else config.get("input_key"),
            label_key=label_key if label_key is not None else config.get("label_key", "cls"),
            preprocess=preprocess,
            transform=image_transform(config),
            tokenizer=config.get("tokenizer"),
            max_length=config.get("max_length"),
        )

    @property
    def num_samples(self) -> int | None:
        """Kept samples per epoch over all nodes and workers (None if the run did not say)."""
        return self.plan.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's shard order (with ``shuffle``); call it on every node, before
        iterating (DataLoader workers copy the dataset when an epoch's iteration starts)."""
        self.epoch = int(epoch)

    def shard_order(self) -> list[FeedShard]:
        shards = list(self.plan.shards)
        if not self.shuffle:
            return shards
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
        return [shards[i] for i in perm]

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.shard_order()
        mine = assigned(order, self.rank, self.world_size, worker, workers)
        if not self.equal_per_rank:
            items: Iterator[Any] = (item for shard in mine for item in self._items(shard))
        else:
            quota = self._quota(worker, workers)
            items = itertools.islice(self._cycled(mine or order, quota), quota)
        if self.shuffle_buffer > 0:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
            items = _buffer_shuffled(items, self.shuffle_buffer, rng)
        yield from items

    def _quota(self, worker: int, workers: int) -> int:
        """Samples this DataLoader worker yields under equal_per_rank."""
        per_rank = int(self.plan.num_samples or 0) // self.world_size
        return per_rank // workers + (1 if worker < per_rank % workers else 0)

    def _cycled(self, shards: list[FeedShard], quota: int) -> Iterator[Any]:
        """The shards' items again and again, until `quota` came (or nothing ever does)."""
        given = 0
        while given < quota:
            before = given
            for shard in shards:
                for item in self._items(shard):
                    yield item
                    given += 1
            if given == before:  # the shards hold nothing: never spin
                return

    def _items(self, shard: FeedShard) -> Iterator[Any]:
        samples = shard_samples(self.plan, shard, self.storage_options)
        while True:
            try:
                sample = next(samples, None)
                if sample is None:
                    return
                item = self.decode(sample)
            except SageError as e:
                if self.on_error == "raise":
                    raise
                log.warning("skipped in training feed: %s", e)
                if isinstance(e, ShardError):
                    return
                continue
            yield item if self.transform is None else self.transform(item)


def _buffer_shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Items in a random order through a buffer of `size` (webdataset's shuffle stage)."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer
