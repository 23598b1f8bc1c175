"""`SelectedDataset`: the kept samples as a torch IterableDataset, split over nodes and
DataLoader workers so that every kept sample comes out exactly once per epoch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..decode import make_decoder
from ..errors import InputError, SageError, ShardError
from ..sample import Sample
from ..transforms import image_transform
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
    (``set_epoch``), the same on every node and worker. ``on_error="skip"`` logs and skips an
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
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
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
        for shard in assigned(self.shard_order(), self.rank, self.world_size, worker, workers):
            yield from self._items(shard)

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
