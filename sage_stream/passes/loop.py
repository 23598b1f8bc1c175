"""The one shard loop both passes consume, and the context it runs in.

    read (formats) → decode + batch (batches) → model → gradient features (gradients)

`shard_items(ctx, ref)` streams one shard as `Featured` batches (inputs, labels, per-sample
gradients and losses) and `Skipped` samples (with the reason they cannot be used), in shard
order, and ends with a `Broken` record if the shard's stream broke part-way. `--on-error` is
applied here and only here: under `fail` the first bad sample or broken stream raises, naming
the shard's URL and the key; under `skip` every problem becomes a record the passes write down.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..batches import Batch, Decoder, Skipped, decoded_batches
from ..config import Config, shard_options
from ..decode import make_decoder
from ..errors import InputError, SampleError, ShardError
from ..formats import read_shard
from ..gradients import GradientFeaturizer
from ..inputs import expand_inputs
from ..model import load_model, resolve_device
from ..outputs.folder import OutputFolder
from ..outputs.identity import sketch_identity
from ..progress import Progress
from ..sample import ShardRef
from ..scores import NONFINITE_GRAD, NONFINITE_LOSS

log = logging.getLogger("sage_stream")


@dataclass
class StageContext:
    """What both passes share for a run: the loaded model, its featurizer, the decoder."""

    cfg: Config
    out: OutputFolder
    refs: list[ShardRef]
    model: nn.Module
    fingerprint: str
    device: torch.device
    featurizer: GradientFeaturizer
    decoder: Decoder

    @property
    def num_classes(self) -> int:
        return self.featurizer.num_classes

    def identity(self) -> dict:
        """The sketch identity of this run (outputs.identity)."""
        f = self.featurizer
        return sketch_identity(self.cfg, self.fingerprint, f.head_name, f.dim, self.num_classes)


@dataclass
class Featured:
    """A batch the model took: its samples and their gradient features, on the model's device."""

    batch: Batch
    grads: Tensor  # (B, D) float32
    loss: Tensor  # (B,) float32
    y: Tensor  # (B,) int64

    @property
    def usable(self) -> Tensor:
        """(B,) bool: finite loss and gradient; only these enter the sketch."""
        return torch.isfinite(self.loss) & torch.isfinite(self.grads).all(dim=1)


@dataclass
class Broken:
    """The shard's stream broke after the items before this one (under --on-error skip)."""

    reason: str


Item = Featured | Skipped | Broken


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
    out = cfg.output
    return StageContext(cfg, out, refs, model, digest, device, featurizer, decoder)


def shard_items(ctx: StageContext, ref: ShardRef, progress: Progress) -> Iterator[Item]:
    """Stream one shard as Featured / Skipped items, then a Broken one if its stream broke.

    `progress` advances by an item's samples once the consumer is done with it.
    """
    fail = ctx.cfg.on_error == "fail"
    try:
        for entry in shard_batches(ctx, ref):
            if isinstance(entry, Skipped):
                if fail:
                    raise SampleError(ref.name, entry.key, entry.reason, ref.url)
                yield entry
                progress.advance(1)
                continue
            featured = _featurize(ctx, ref, entry, fail)
            if isinstance(featured, list):  # the model refused the batch: a skip per sample
                yield from featured
                progress.advance(len(featured))
                continue
            yield featured
            progress.advance(len(featured.batch.keys))
    except ShardError as exc:
        if fail:
            raise
        log.warning("%s: the rest of %s is lost: %s", progress.name, ref.name, exc.reason)
        yield Broken(exc.reason)


def shard_batches(ctx: StageContext, ref: ShardRef) -> Iterator[Batch | Skipped]:
    """One shard read, decoded and batched, before the model (forward-only benchmarks too)."""
    cfg = ctx.cfg
    samples = read_shard(ref, cfg.storage_options, **shard_options(cfg, ref.format))
    return decoded_batches(
        samples, ctx.decoder, batch_size=cfg.batch_size, num_classes=ctx.num_classes
    )


def _featurize(
    ctx: StageContext, ref: ShardRef, batch: Batch, fail: bool
) -> Featured | list[Skipped]:
    """Gradient features of a batch; a batch the model cannot take is a skip for each of its
    samples (naming the first key under fail), and under fail a non-finite sample raises."""
    x = batch.x.to(ctx.device, non_blocking=True)
    y = batch.y.to(ctx.device, non_blocking=True)
    try:
        feats = ctx.featurizer(x, y)
    except torch.cuda.OutOfMemoryError:
        raise  # the machine's limit, not the input's fault
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = f"the model cannot take this input of shape {tuple(batch.x.shape[1:])}: {first}"
        if fail:
            raise SampleError(ref.name, batch.keys[0], reason, ref.url) from None
        labels = batch.y.tolist()
        return [Skipped(k, i, reason, label)
                for k, i, label in zip(batch.keys, batch.indices, labels, strict=True)]  # fmt: skip
    item = Featured(batch, feats.grads, feats.loss, y)
    if fail:
        _raise_first_nonfinite(ref, item)
    return item


def _raise_first_nonfinite(ref: ShardRef, item: Featured) -> None:
    for values, reason in ((item.loss, NONFINITE_LOSS), (item.grads.flatten(1), NONFINITE_GRAD)):
        bad = (~torch.isfinite(values.reshape(len(item.batch.keys), -1))).any(dim=1)
        if bool(bad.any()):
            key = item.batch.keys[int(bad.nonzero()[0, 0])]
            raise SampleError(ref.name, key, reason, ref.url)
