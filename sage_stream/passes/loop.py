"""The one shard loop both passes consume, and the context it runs in.

    read (formats) → decode + batch (batches) → model → gradient features (gradients)

`shard_items(ctx, ref)` streams one shard as `Featured` batches (inputs, labels, per-sample
gradients and losses) and `Skipped` samples (with the reason they cannot be used), in shard
order, and ends with a `Broken` record if the shard's stream broke part-way. `--on-error` is
applied here and only here: under `fail` the first bad sample or broken stream raises, naming
the shard's URL and the key; under `skip` every problem becomes a record the passes write down.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..config import PREDICTED, Config, shard_options
from ..decode.batches import Batch, Decoder, Inputs, Skipped, input_shape, to_device
from ..decode.decoder import make_decoder
from ..decode.images import image_transform
from ..errors import InputError, SampleError, ShardError
from ..formats import FORMATS
from ..gradients.featurizer import Features, Featurizer, GradientFeaturizer, InputShapeError
from ..gradients.model import load_model, resolve_device
from ..inputs import expand_inputs
from ..outputs.folder import OutputFolder, output_of
from ..outputs.identity import sketch_identity
from ..progress import Progress
from ..sample import ShardRef
from ..scores import (
    GRAD_OUTLIER,
    MAX_GRAD_NORM,
    NONFINITE_GRAD,
    NONFINITE_LOSS,
    grad_norms,
    usable,
)
from ..signature import copy_signature, label_margin
from .checks import FailFast
from .kept import HeadIO, Keeper, fit_hint, kept_batches, kept_names
from .loader import ReadSpec, decoded_shards, loader_workers_for

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
    featurizer: Featurizer
    decoder: Decoder
    loader_workers: int = 0  # decode processes (0: in this process), resolved from the cfg
    warned: set[str] = field(default_factory=set)  # warnings already given in this run
    fail_fast: FailFast = field(default_factory=FailFast)  # stops a run where nearly all fail
    fitted_shape: Any = None  # the per-sample input shape of the first batch the model took

    @property
    def num_classes(self) -> int:
        # None only in params mode with no nn.Linear, until the featurizer's first call
        return cast(int, self.featurizer.num_classes)

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
    margin: Tensor | None = None  # (B,) float64 label logit − largest other (signature.py)
    signature: Tensor | None = None  # (B, 32) float32 near-copy signature, last-layer mode
    kept: tuple[Tensor, Tensor] | None = None  # (h, logits) float32 they follow from (kept.py)

    @cached_property
    def usable(self) -> Tensor:
        """(B,) bool: finite loss and gradient, not an outlier; only these enter the sketch.
        Computed once per batch, on the device, from one float32 pass over the rows."""
        return usable(self.loss, self.grads)


@dataclass
class Bypassed:
    """A batch the consumer said it does not need (`shard_stream(needed=...)`): the model
    did not run on it. Pass 1 on Ray reads the samples before its first group this way."""

    batch: Batch


@dataclass
class Broken:
    """The shard's stream broke after the items before this one (under --on-error skip)."""

    reason: str


Item = Featured | Skipped | Broken | Bypassed
Needed = Callable[[ShardRef, Batch], bool]  # whether a batch needs the model


def build_context(cfg: Config, refs: list[ShardRef] | None = None) -> StageContext:
    """Expand the inputs, load the model and set up gradient features, once per run."""
    if cfg.model is None:
        raise InputError("no model: pass --model MODULE:FUNCTION")
    refs = refs if refs is not None else expand_inputs(cfg.inputs, cfg.storage_options)
    device = resolve_device(cfg.device)
    model, digest = load_model(
        cfg.model, cfg.checkpoint, device, cfg.storage_options, args=cfg.model_args, seed=cfg.seed
    )
    featurizer = GradientFeaturizer(
        model,
        mode=cfg.grad,
        head=cfg.head,
        params=cfg.params,
        project_dim=cfg.project_dim,
        seed=cfg.seed,
        chunk_size=cfg.chunk_size,
        precision=cfg.precision,
        output_key=cfg.output_key,
        pseudo_labels=cfg.label_key == PREDICTED,
    )
    decoder = make_decoder(
        input_key=cfg.input_key,
        label_key=cfg.label_key,
        preprocess=cfg.preprocess,
        transform=image_transform(cfg),
        tokenizer=cfg.tokenizer,
        max_length=cfg.max_length,
        max_member_bytes=cfg.max_member_bytes,
    )
    workers = loader_workers_for(cfg.loader_workers, device, [r.url for r in refs])
    return StageContext(
        cfg, output_of(cfg), refs, model, digest, device, featurizer, decoder, workers
    )


def shard_stream(
    ctx: StageContext,
    refs: Sequence[ShardRef],
    progress: Progress,
    needed: Needed | None = None,
    keeper: Keeper | None = None,
) -> Generator[tuple[ShardRef, Iterator[Item]], None, None]:
    """(shard, its items) for each of `refs` in order, read and decoded by the loader's
    `--loader-workers` processes (passes/loader.py); consume each shard's items in turn.
    A batch for which `needed` says False comes as `Bypassed`, without running the model.
    With `keeper` (pass 1), a shard whose items were all taken is kept for pass 2 (kept.py)."""
    batches = decoded_shards(read_spec(ctx), refs, ctx.loader_workers)
    with contextlib.closing(batches):
        for ref, shard in batches:
            yield ref, _items(ctx, ref, shard, progress, needed, keeper)


def score_stream(
    ctx: StageContext, refs: Sequence[ShardRef], progress: Progress
) -> Iterator[tuple[ShardRef, Iterator[Item]]]:
    """Pass 2's `shard_stream`: a shard that pass 1 kept is replayed from its file (kept.py),
    the others are read by the loader as in pass 1."""
    kept = kept_names(ctx)
    read = shard_stream(ctx, [r for r in refs if r.name not in kept], progress)
    if kept:
        log.info("pass 2: %d of %d shards from what pass 1 kept", len(kept & {r.name for r in refs}),
                 len(refs))  # fmt: skip
    with contextlib.closing(read):
        for ref in refs:
            # a kept file from another run, or cut short: that shard is read here
            yield next(read) if ref.name not in kept else (ref, pass2_items(ctx, ref, progress))


def pass2_items(ctx: StageContext, ref: ShardRef, progress: Progress) -> Iterator[Item]:
    """One shard's items for pass 2 in this process: replayed if pass 1 kept it, else read."""
    replayed = kept_batches(ctx, ref)
    if replayed is None:
        return shard_items(ctx, ref, progress)
    return _items(ctx, ref, replayed, progress)


def shard_items(ctx: StageContext, ref: ShardRef, progress: Progress) -> Iterator[Item]:
    """One shard's items, read and decoded in this process."""
    return _items(ctx, ref, shard_batches(ctx, ref), progress)


def _items(
    ctx: StageContext,
    ref: ShardRef,
    batches: Iterator[Batch | Skipped],
    progress: Progress,
    needed: Needed | None = None,
    keeper: Keeper | None = None,
) -> Iterator[Item]:
    """Featured / Skipped items, then a Broken one if the shard's stream broke.

    `progress` advances by an item's samples once the consumer is done with it. With
    `keeper`, the items are recorded and kept once the consumer has taken the last one.
    """
    fail = ctx.cfg.on_error == "fail"
    shapes: set = set()
    shape = None  # the batch's per-sample input shape (a replayed one has none)
    record = keeper.record(ref) if keeper is not None else None
    try:
        for entry in batches:
            if isinstance(entry, Skipped):
                if fail:
                    raise SampleError(ref.name, entry.key, entry.reason, ref.url)
                ctx.fail_fast.record(0, [entry.reason])
                yield entry
                progress.advance(1)
                if record is not None:
                    record.skipped(entry)
                continue
            if needed is not None and not needed(ref, entry):
                yield Bypassed(entry)
                progress.advance(len(entry.keys))
                record = None  # the shard was not featurized whole here
                continue
            if not isinstance(entry.x, HeadIO):
                shape = _sample_shape(entry.x)
                shapes.add(shape)
                if len(shapes) > 1:
                    _warn_shapes(ctx, ref, shapes)
            featured = _featurize(ctx, ref, entry, fail)
            if isinstance(featured, list):  # the model refused the batch: a skip per sample
                ctx.fail_fast.record(0, [f.reason for f in featured])
                yield from featured
                progress.advance(len(featured))
                if record is not None:
                    for skipped in featured:
                        record.skipped(skipped, fit_hint(ctx))
                continue
            _record(ctx.fail_fast, featured)
            yield featured
            progress.advance(len(featured.batch.keys))
            if record is not None:
                record.featured(featured, shape)
    except ShardError as exc:
        if fail:
            raise
        log.warning("%s: the rest of %s is lost: %s", progress.name, ref.name, exc.reason)
        yield Broken(exc.reason)
        return
    if keeper is not None and record is not None:  # every item was taken
        keeper.finish(record)


def _record(check: FailFast, item: Featured) -> None:
    if check.checked:  # past its one check point: no host sync per batch for it
        return
    usable = item.usable
    ok = int(usable.sum())
    bad_loss = ~torch.isfinite(item.loss[~usable])
    reasons = [NONFINITE_LOSS if b else NONFINITE_GRAD for b in bad_loss.tolist()]
    check.record(ok, reasons)


def _sample_shape(x: Inputs) -> Any:
    """Per-sample shape of a batch's inputs, hashable: (C, H, W) or ((key, shape), ...)."""
    shape = input_shape(x)
    if isinstance(shape, dict):  # sequences are padded per batch: only the keys matter here
        return tuple(sorted(shape))
    return shape[1:]


def _warn_shapes(ctx: StageContext, ref: ShardRef, shapes: set) -> None:
    """Once per run: inputs of several shapes run in smaller batches, and a model trained on
    fixed-size, normalised images judges native-size ones poorly."""
    if "shapes" in ctx.warned:
        return
    ctx.warned.add("shapes")
    some = ", ".join(str(s) for s in sorted(shapes)[:3])
    log.warning(
        "inputs of different shapes in %s (%s): they are batched by shape; for images give "
        "--resize N --crop N (and --normalize) as the model was trained",
        ref.name,
        some,
    )


def read_spec(ctx: StageContext) -> ReadSpec:
    """What the loader needs to read and decode this run's shards, in or out of process."""
    cfg = ctx.cfg
    return ReadSpec(
        decoder=ctx.decoder,
        storage_options=cfg.storage_options,
        reader_options={fmt: shard_options(cfg, fmt) for fmt in FORMATS},
        batch_size=cfg.batch_size,
        num_classes=ctx.num_classes,
    )


def shard_batches(ctx: StageContext, ref: ShardRef) -> Iterator[Batch | Skipped]:
    """One shard read, decoded and batched in this process, before the model (forward-only
    benchmarks too)."""
    return read_spec(ctx).batches(ref)


def _featurize(
    ctx: StageContext, ref: ShardRef, batch: Batch, fail: bool
) -> Featured | list[Skipped]:
    """Gradient features of a batch; a batch the model cannot take is a skip for each of its
    samples (naming the first key under fail), and under fail a non-finite sample raises."""
    y = cast(Tensor, to_device(batch.y, ctx.device))
    if isinstance(batch.x, HeadIO):  # pass 2 from what pass 1 kept
        if ctx.fitted_shape is None:  # as the batch's forward would have set it
            ctx.fitted_shape = batch.x.shape
        h, logits = (t.to(ctx.device) for t in (batch.x.h, batch.x.logits))
        return _featured(ctx, ref, batch, ctx.featurizer.replay(h, logits, y), fail)
    x = to_device(batch.x, ctx.device)
    try:
        # labels were checked against C when the batch was decoded (batches._decode)
        feats = ctx.featurizer(x, y, labels_checked=ctx.featurizer.num_classes is not None)
    except torch.cuda.OutOfMemoryError:
        raise  # the machine's limit, not the input's fault
    except (RuntimeError, InputShapeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shape = _sample_shape(batch.x)
        # and the shape this run's other inputs have
        reason = f"the model cannot take this input of shape {shape}: {first}{fit_hint(ctx)}"
        if fail:
            raise SampleError(ref.name, batch.keys[0], reason, ref.url) from None
        labels = batch.y.tolist()
        return [Skipped(k, i, reason, label)
                for k, i, label in zip(batch.keys, batch.indices, labels, strict=True)]  # fmt: skip
    if ctx.fitted_shape is None:
        ctx.fitted_shape = _sample_shape(batch.x)
    return _featured(ctx, ref, batch, feats, fail)


def _featured(ctx: StageContext, ref: ShardRef, batch: Batch, feats: Features, fail: bool
              ) -> Featured:  # fmt: skip
    if ctx.featurizer.pseudo_labels:  # --label-key predicted: scores/ records the model's
        batch.y = feats.labels.to("cpu")
    signature = None if feats.head_input is None else copy_signature(feats.head_input)
    margin = label_margin(feats.logits, feats.labels)
    kept = None
    if ctx.featurizer.replayable and feats.head_input is not None:
        kept = (feats.head_input, feats.logits)
    item = Featured(batch, feats.grads, feats.loss, feats.labels, margin, signature, kept)
    if fail:
        _raise_first_nonfinite(ref, item)
    return item


def _raise_first_nonfinite(ref: ShardRef, item: Featured) -> None:
    """Under --on-error fail: the first non-finite loss, else gradient, else outlier, raises.
    One host sync per batch when all is well; the rows are read again only when it is not."""
    if bool(item.usable.all()):
        return
    grads = item.grads
    checks = (
        (~torch.isfinite(item.loss), NONFINITE_LOSS),
        (~torch.isfinite(grads).all(dim=1), NONFINITE_GRAD),
        (grad_norms(grads) > MAX_GRAD_NORM, GRAD_OUTLIER),
    )
    for bad, reason in checks:
        if bool(bad.any()):
            key = item.batch.keys[int(bad.nonzero()[0, 0])]
            raise SampleError(ref.name, key, reason, ref.url)
