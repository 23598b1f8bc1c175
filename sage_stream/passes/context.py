"""What both passes share: the loaded model, its gradient featurizer, the decoder, the shards."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import Batch, Decoder, Skipped, decoded_batches
from ..config import Config, shard_options
from ..decode import make_decoder
from ..errors import InputError, SampleError
from ..formats import read_shard
from ..gradients import Features, GradientFeaturizer
from ..model import load_model, resolve_device
from ..sample import ShardRef
from ..urls import expand_inputs


@dataclass
class StageContext:
    cfg: Config
    refs: list[ShardRef]
    model: nn.Module
    fingerprint: str
    device: torch.device
    featurizer: GradientFeaturizer
    decoder: Decoder

    @property
    def num_classes(self) -> int:
        return self.featurizer.num_classes

    def identity(self) -> dict[str, Any]:
        """Everything that must match for a stored sketch to be usable with this run."""
        return {
            "model": self.fingerprint,
            **self.cfg.sketch_identity(),
            "head": self.featurizer.head_name,
            "dim": self.featurizer.dim,
            "classes": self.num_classes,
        }

    def batches(self, ref: ShardRef) -> Iterator[Batch | Skipped]:
        cfg = self.cfg
        samples = read_shard(ref, cfg.storage_options, **shard_options(cfg, ref.format))
        batches = decoded_batches(
            samples,
            self.decoder,
            batch_size=cfg.batch_size,
            num_classes=self.num_classes,
            on_error=cfg.on_error,
        )
        try:
            yield from batches
        except SampleError as exc:  # under --on-error fail: name the URL too
            raise exc.with_url(ref.url) from None

    def features(self, ref: ShardRef, batch: Batch) -> Features:
        """Gradient features of a batch; a batch the model cannot take is a SampleError
        (naming its first key) that the passes record for each of its samples, or raise."""
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True)
        try:
            return self.featurizer(x, y)
        except torch.cuda.OutOfMemoryError:
            raise  # the machine's limit, not the input's fault
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = (
                f"the model cannot take this input of shape {tuple(batch.x.shape[1:])}: {first}"
            )
            raise SampleError(ref.name, batch.keys[0], reason, ref.url) from None


def build_context(cfg: Config, refs: list[ShardRef] | None = None) -> StageContext:
    """Expand the inputs, load the model and set up gradient features, once per run."""
    if cfg.model is None:
        raise InputError("no model: pass --model MODULE:FUNCTION")
    refs = refs if refs is not None else expand_inputs(cfg.inputs, cfg.storage_options)
    device = resolve_device(cfg.device)
    model, digest = load_model(cfg.model, cfg.checkpoint, device, cfg.storage_options)
    featurizer = GradientFeaturizer(
        model,
        mode=cfg.grad,
        head=cfg.head,
        params=cfg.params,
        project_dim=cfg.project_dim,
        seed=cfg.seed,
        chunk_size=cfg.chunk_size,
    )
    decoder = make_decoder(
        input_key=cfg.input_key, label_key=cfg.label_key, preprocess=cfg.preprocess
    )
    return StageContext(cfg, refs, model, digest, device, featurizer, decoder)
