"""Pass 1: shards → per-sample gradients → Frequent Directions sketch + class sums → sketch.zarr.

Memory is O(ℓ·D + C·D + batch) per open node of the merge tree: the FD buffer (2ℓ×D), the
class sums (C×D, float64 so that millions of small gradients add up exactly enough), and one
batch. Samples that pass 2 will record as errors (undecodable, non-finite) never enter the
sketch.

The rows are cut into groups, each sketched from an empty state, and the groups are merged in a
tree, both placed by the samples' content (`groups.py`): the same samples in the same order give
the same sketch whatever the shards, and about N / (16ℓ) merges however many shards there are.
An executor runs the pass as *units*: stretches of consecutive shards (`plan_units`). A unit
starts at the first group that starts in its shards and reads on past its last shard to the
end of its last group; it folds what lies inside it and stores the rest as items in OUT/_work/,
which `finish_units` replays in unit order. The local executor runs one unit, the whole stream;
the Ray executor one per worker, on any worker: the sketch, the scores and the kept set are the
same bytes either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..decode.batches import Batch
from ..errors import InputError, MismatchError
from ..fd import FrequentDirections
from ..progress import Progress
from ..sample import ShardRef
from ..scores import consensus_directions
from .groups import TOP, Fold, Item, boundary_level, group_rows
from .kept import Keeper
from .loop import Broken, Featured, StageContext, shard_stream

log = logging.getLogger("sage_stream")
Summary = dict[str, Any]  # a unit's outcome: its items (descriptors) and its shards' errors


@dataclass
class SketchState:
    """What one node of the merge tree holds; small enough to checkpoint: O(ℓ·D + C·D)."""

    fd: FrequentDirections
    class_sums: Tensor  # (C, D) float64
    class_counts: Tensor  # (C,) int64

    def checkpoint(self) -> dict[str, Any]:
        return {
            "fd": self.fd.state_dict(),
            "class_sums": self.class_sums.cpu(),
            "class_counts": self.class_counts.cpu(),
        }

    @classmethod
    def from_checkpoint(cls, ctx: StageContext, ckpt: dict[str, Any]) -> SketchState:
        fd = FrequentDirections.from_state_dict(ckpt["fd"], device=ctx.device)
        return cls(fd, ckpt["class_sums"].to(ctx.device), ckpt["class_counts"].to(ctx.device))

    @classmethod
    def empty(cls, ctx: StageContext) -> SketchState:
        dim, classes = ctx.featurizer.dim, ctx.num_classes
        return cls(
            FrequentDirections(ctx.cfg.ell, dim, device=ctx.device),
            torch.zeros(classes, dim, dtype=torch.float64, device=ctx.device),
            torch.zeros(classes, dtype=torch.int64, device=ctx.device),
        )

    def add(self, grads: Tensor, labels: Tensor, num_classes: int) -> None:
        """Usable rows (n, D), already checked finite, and their labels (n,).

        The class sums take one float32 product onehotᵀ·G per call, added to the float64
        sums: no D-wide float64 copy of the rows, no scatter. On the CPU the product and the
        sum cover only the call's own classes (at most n of the C: the (C, D) float64 sums are
        most of the memory traffic, C·n·D the FLOPs); the rows of the others would add zeros,
        and the rows kept are the same bits. Elsewhere the classes present would cost a
        host synchronisation, so every class is summed."""
        self.fd.update(grads, checked=True)
        if grads.device.type == "cpu":
            present = torch.unique(labels)  # sorted, (K,)
            onehot = (labels[:, None] == present[None, :]).to(grads.dtype)  # (n, K)
            self.class_sums.index_add_(0, present, (onehot.T @ grads).to(torch.float64))
            self.class_counts.index_add_(0, present, onehot.sum(dim=0).to(torch.int64))
            return
        onehot = torch.nn.functional.one_hot(labels, num_classes).to(grads.dtype)  # (n, C)
        self.class_sums += (onehot.T @ grads).to(torch.float64)  # (C, D)
        self.class_counts += onehot.sum(dim=0).to(torch.int64)

    def merge(self, other: SketchState) -> None:
        """other's rows streamed in after ours (fd.merge); class sums and counts add."""
        self.fd.merge(other.fd)
        self.class_sums += other.class_sums  # (C, D) float64
        self.class_counts += other.class_counts


@dataclass
class SketchResult:
    url: str
    samples: int  # rows that entered the sketch
    classes: int
    dim: int
    ell: int
    stats: dict[str, Any]
    shard_errors: list[dict[str, str]]
    seconds: float


def plan_units(refs: list[ShardRef], units: int) -> list[tuple[int, int]]:
    """`units` stretches [lo, hi) of consecutive shards, as even as possible, none empty
    (fewer when there are fewer shards). They decide only who reads what, never the bytes."""
    count = max(1, min(units, len(refs)))
    size, extra = divmod(len(refs), count)
    bounds, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def unit_checkpoint(ctx: StageContext, unit: int, units: int) -> str:
    """Where unit `unit` of `units` keeps its pass 1 state (the same for every executor)."""
    return ctx.out.work(f"pass1-unit-{unit:05d}-of-{units:05d}.pt")


class UnitRun:
    """Pass 1 over one unit: its own shards refs[lo:hi], from the first group that starts in
    them (unit 0: from the first sample) to the end of the group open at hi."""

    def __init__(self, ctx: StageContext, refs: list[ShardRef], unit: int, units: int,
                 bounds: tuple[int, int], store: bool):  # fmt: skip
        self.ctx, self.refs, self.unit, self.units = ctx, refs, unit, units
        self.lo, self.hi = bounds
        self.store = store  # items go to OUT/_work/ (else they stay in memory: one unit)
        self.position = self.lo  # the next shard to read
        self.fold: Fold[SketchState] | None = Fold(self._empty) if unit == 0 else None
        self.items: list[dict[str, Any]] = []
        self.shard_errors: list[dict[str, str]] = []
        self.done = False
        self.rows = group_rows(ctx.cfg.ell)
        self.index = {ref.name: i for i, ref in enumerate(refs)}
        self.url = unit_checkpoint(ctx, unit, units)

    def _empty(self) -> SketchState:
        return SketchState.empty(self.ctx)

    # --- resume ------------------------------------------------------------------------------
    def resume(self) -> None:
        saved = self.ctx.out.load_state(self.url)
        if saved is None:
            return
        self.position, self.done = int(saved["position"]), bool(saved["done"])
        self.items, self.shard_errors = list(saved["items"]), list(saved["shard_errors"])
        if saved["fold"] is not None:
            load = lambda ckpt: SketchState.from_checkpoint(self.ctx, ckpt)  # noqa: E731
            self.fold = Fold.restore(saved["fold"], self._empty, load)
        if not self.done and self.position > self.lo:
            log.info("pass 1: unit %d resumes at shard %d", self.unit, self.position)

    def save(self) -> None:
        fold = None if self.fold is None else self.fold.state(SketchState.checkpoint)
        self.ctx.out.save_state(self.url, {
            "position": self.position, "done": self.done, "items": self.items,
            "shard_errors": self.shard_errors, "fold": fold,
        })  # fmt: skip

    # --- the stream --------------------------------------------------------------------------
    def needed(self, ref: ShardRef, batch: Batch) -> bool:
        """Run the model on a batch unless every sample of it comes before the unit's start.
        (A batch that holds the start runs whole: the model sees the batches a local run
        gives it, so its outputs are the same bits.)"""
        return self.fold is not None or any(self._levels(batch))

    def run(self, progress: Progress) -> None:
        """Read from `position` to the unit's end, saving a checkpoint every
        `checkpoint_every` seconds (between shards)."""
        if self.done:
            return
        last_save = time.monotonic()
        keeper = Keeper(self.ctx, self.ctx.cfg.feature_cache // self.units)  # for pass 2
        stream = shard_stream(self.ctx, self.refs[self.position :], progress, self.needed, keeper)
        try:
            for ref, items in stream:
                if self.fold is None and self.index[ref.name] >= self.hi:
                    break  # no group starts in this unit's shards: the units before cover it
                if self._consume(ref, items):
                    break
                self.position += 1
                progress.shard_done(ref.name)
                if time.monotonic() - last_save >= self.ctx.cfg.checkpoint_every:
                    self.save()
                    last_save = time.monotonic()
            else:
                if self.fold is not None:
                    self._stop(TOP)  # the end of the stream
        finally:
            getattr(stream, "close", lambda: None)()  # the loader's processes, if any
        self.done = True
        if self.store:  # else the caller finishes the sketch now, from memory
            self.save()

    def summary(self) -> Summary:
        return {"items": self.items, "shard_errors": self.shard_errors}

    def _levels(self, batch: Batch) -> list[int]:
        return [boundary_level(d, self.rows) for d in batch.digests]

    def _consume(self, ref: ShardRef, items: Iterable[Any]) -> bool:
        """One shard's items; True if the unit ended in it (at a group start past hi)."""
        own = self.index[ref.name] < self.hi
        for item in items:
            if isinstance(item, Featured) and self._featured(item, own):
                return True
            if isinstance(item, Broken) and own:
                error = {"shard": ref.name, "url": ref.url, "reason": item.reason}
                self.shard_errors.append(error)
            # a Skipped sample is recorded in scores/ by pass 2; a Bypassed batch is before
            # the unit's first group
        return False

    def _featured(self, item: Featured, own: bool) -> bool:
        """Add a batch's usable rows group by group; True if the unit's end is in it."""
        usable = item.usable  # (B,) bool on the device
        start = 0
        for i, level in enumerate(self._levels(item.batch)):
            if level == 0:
                continue
            self._add(item, usable, start, i)
            start = i
            if self.fold is None:  # the unit's first group starts here
                self.fold = Fold(self._empty, fresh=level)
            elif not own:  # the first group start past hi: the next unit's
                self._stop(level)
                return True
            else:
                self.fold.boundary(level)
                self._flush()
        self._add(item, usable, start, len(item.batch.keys))
        return False

    def _add(self, item: Featured, usable: Tensor, start: int, stop: int) -> None:
        if self.fold is None or start == stop:
            return
        keep = usable[start:stop]
        # boolean indexing: the one host sync of a batch in pass 1 (the row count decides
        # when FD shrinks, and a shrink's eigh runs on the host anyway)
        grads, labels = item.grads[start:stop][keep], item.y[start:stop][keep]
        self.fold.group().add(grads, labels, self.ctx.num_classes)

    def _stop(self, level: int) -> None:
        assert self.fold is not None
        self.fold.handover(level)
        self._flush()

    def _flush(self) -> None:
        """The fold's new items, stored (their states in OUT/_work/) or kept in memory."""
        assert self.fold is not None
        for item in self.fold.items:
            desc: dict[str, Any] = {"kind": item.kind, "level": item.level,
                                    "boundary": item.boundary, "url": None}  # fmt: skip
            if item.state is not None and self.store:
                desc["url"] = f"{self.url[:-3]}-item-{len(self.items):05d}.pt"
                state = {**item.state.checkpoint(), "identity": self.ctx.identity()}
                self.ctx.out.save_state(desc["url"], state)
            elif item.state is not None:
                desc["state"] = item.state
            self.items.append(desc)
        self.fold.items = []


def sketch_unit(
    ctx: StageContext,
    refs: list[ShardRef],
    unit: int,
    units: int,
    progress: Progress | None = None,
) -> Summary:
    """Pass 1 over one unit of `plan_units(refs, units)`, resuming from its checkpoint, its
    items stored in OUT/_work/ (a Ray worker's job)."""
    bounds = plan_units(refs, units)[unit]
    run = UnitRun(ctx, refs, unit, units, bounds, store=True)
    run.resume()
    run.run(progress or Progress("pass 1 (sketch)", bounds[1] - bounds[0], False))
    return run.summary()


def load_item(ctx: StageContext, desc: dict[str, Any], unit: int) -> SketchState | None:
    """An item's state: in memory, or loaded from OUT/_work/ and checked to be this run's."""
    if "state" in desc:
        return desc["state"]
    if desc["url"] is None:
        return None
    part = ctx.out.load_state(desc["url"])
    if part is None:
        raise InputError(f"pass 1: {desc['url']} is missing; run again with --overwrite")
    mine = ctx.identity()
    if part["identity"] != mine:  # a worker that loaded other weights would merge silently
        raise MismatchError(
            f"the pass 1 partial of unit {unit} was made with another model or "
            f"configuration ({part['identity']} vs {mine}): do the checkpoint or the model "
            "code differ between the Ray nodes?"
        )
    return SketchState.from_checkpoint(ctx, part)


def finish_units(ctx: StageContext, summaries: list[Summary], seconds: float) -> SketchResult:
    """Replay the units' items in order (one state per tree level in memory), store the
    sketch, drop the units' checkpoints and items."""
    fold: Fold[SketchState] = Fold(lambda: SketchState.empty(ctx))
    for unit, summary in enumerate(summaries):
        for desc in summary["items"]:
            state = load_item(ctx, desc, unit)
            fold.replay(Item(desc["kind"], desc["level"], state, desc["boundary"]))
    state = fold.result() or SketchState.empty(ctx)
    errors = [e for summary in summaries for e in summary["shard_errors"]]
    result = finish_sketch(ctx, state, errors, seconds)
    for unit, summary in enumerate(summaries):
        for desc in summary["items"]:
            if desc.get("url"):
                ctx.out.remove(desc["url"])
        ctx.out.remove(unit_checkpoint(ctx, unit, len(summaries)))
    return result


def finish_sketch(
    ctx: StageContext, state: SketchState, shard_errors: list[dict[str, str]], seconds: float
) -> SketchResult:
    """Finalize the FD sketch, derive the class consensus directions and store both."""
    fd = state.fd
    sigma, basis = fd.finalize()
    consensus = consensus_directions(sigma, basis, state.class_sums)
    frob = fd.frobenius_sq
    stats = {
        "n": fd.n_rows,
        "frobenius_sq": frob,
        "delta": fd.delta,
        "relative_error_bound": fd.delta / frob if frob else 0.0,
        "captured": float((sigma.double() ** 2).sum()) / frob if frob else 0.0,
        "shard_errors": shard_errors,
    }
    ctx.out.sketch_store().write(
        sigma=sigma,
        basis=basis,
        consensus=consensus,
        class_counts=state.class_counts,
        identity=ctx.identity(),
        stats=stats,
    )
    return SketchResult(
        ctx.out.sketch, fd.n_rows, ctx.num_classes, fd.dim, fd.ell, stats, shard_errors, seconds
    )


def stored_result(ctx: StageContext) -> SketchResult | None:
    """The finished sketch of an earlier run with this identity, if there is one."""
    try:
        head = ctx.out.sketch_store().header(expected=ctx.identity())
    except InputError:  # absent or incomplete: sketch it (a mismatch still raises)
        return None
    stats = head["stats"]
    return SketchResult(ctx.out.sketch, stats["n"], head["classes"], head["dim"], head["ell"],
                        stats, stats["shard_errors"], 0.0)  # fmt: skip


def sketch_here(ctx: StageContext) -> SketchResult:
    """Pass 1 in this process (the local executor): one unit, the whole stream, read by the
    loader's processes; resumed from its checkpoint if a killed run left one."""
    progress = Progress("pass 1 (sketch)", len(ctx.refs), ctx.cfg.progress)
    run = UnitRun(ctx, ctx.refs, 0, 1, (0, len(ctx.refs)), store=False)
    run.resume()
    progress.shards = run.position
    run.run(progress)
    return finish_units(ctx, [run.summary()], progress.close())
