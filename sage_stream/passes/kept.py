"""Pass 2 from what pass 1 kept: each sample's head input and logits instead of the shard.

    pass 1: shard → decode → model → (h, logits) → gradients → sketch
                                        └→ OUT/_work/kept/<shard>.parquet
    pass 2: OUT/_work/kept/<shard>.parquet → (h, logits) → gradients → scores
            (or, where there is no such file, the shard read, decoded and run again)

In last-layer mode a sample's gradient, loss, margin and near-copy signature follow in closed
form from the head's input h (H floats) and output (C logits): `Featurizer.replay` computes
them with the very operations pass 1 ran, on the same float32 values, so pass 2 gets the same
bits without reading, decoding or running the model again. A sample costs (H + C)·4 bytes: 1 KB
for a 256-wide head over 10 classes, 12 KB for ResNet-50 on ImageNet (a tenth of its JPEG).

Pass 1 keeps a shard when it featurized all of it in one stream (a Ray unit that starts or
stops inside a shard does not keep that one) and it holds at least MIN_SAMPLES samples, within
`--feature-cache` bytes for the run (each of U units gets 1/U of it); everything else is read
again in pass 2, as before, so a file
that is missing, from another run or unreadable costs time, never results. A file is removed
once pass 2 has replayed it, and the rest of OUT/_work/ when the run succeeds.

Nothing here is pickled: the file is Parquet (keys, positions, labels, digests, reasons, and
h and the logits as fixed-size float32 lists), and its metadata names the run it belongs to.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..decode.batches import Batch, Skipped
from ..errors import SageError
from ..outputs.tables import read_table
from ..sample import ShardRef
from ..storage import pin_of

if TYPE_CHECKING:
    from .loop import Featured, StageContext

log = logging.getLogger("sage_stream")
KEPT = "kept"  # the folder under OUT/_work/
FORMAT = 1  # the layout below; another one is not replayed
META_KEY = b"sage_stream.kept"
NO_BATCH = -1  # the batch column of a sample that did not decode
REFUSED = -2  # ... of one in a batch the model refused (its reason without `fit_hint`)
SHAPE_KEY = b"sage_stream.kept_shape"  # the input shape of the shard's first batch the model took
# A shard of fewer samples is read again instead: its file costs more than it saves. Writing,
# listing, reading and removing one file took about 3 CPU ms here; replaying a sample instead
# of reading, decoding and running the benchmark's MLP on it saved about 75 us (§8 of
# docs/benchmarks.md), so the break-even is some 40 samples, and more with a larger model.
MIN_SAMPLES = 64


@dataclass
class HeadIO:
    """The inputs of a replayed batch, in place of the decoded ones: (B, H) and (B, C) float32,
    and the per-sample input shape of the shard's first batch the model took (`fit_hint`)."""

    h: torch.Tensor
    logits: torch.Tensor
    shape: Any = None


def fit_hint(ctx: StageContext) -> str:
    """What a refused batch's reason adds: the input shape the model took first in this
    process (pass 2 replaying a shard sets it as reading it would have)."""
    return "" if ctx.fitted_shape is None else f"; inputs of shape {ctx.fitted_shape} fit"


def kept_url(ctx: StageContext, ref: ShardRef) -> str:
    return ctx.out.work(KEPT, f"{ref.name}.parquet")


def _meta(ctx: StageContext, ref: ShardRef) -> bytes:
    """What a kept file must have been made with to be replayed in this run."""
    what = {"format": FORMAT, "sketch": ctx.identity(), "url": ref.url, "pin": ref.pin,
            "batch_size": ctx.cfg.batch_size}  # fmt: skip
    return json.dumps(what, sort_keys=True).encode()


class ShardRecord:
    """One shard's items as pass 1 streams them; `whole` until one cannot be replayed."""

    def __init__(self, ref: ShardRef, limit: int):
        self.ref, self.limit = ref, limit  # bytes of h and logits past which it is dropped
        self.whole = True
        self.batches = 0
        self.bytes = 0
        self.shape: Any = None
        self.columns: dict[str, list] = {c: [] for c in ("batch", "key", "index", "label",
                                                         "digest", "reason")}  # fmt: skip
        self.h: list[np.ndarray] = []  # (B, H) per batch, or None per skipped sample
        self.logits: list[np.ndarray] = []

    def skipped(self, item: Skipped, hint: str | None = None) -> None:
        """A sample that did not decode, or (with the `fit_hint` its reason ends with) one of a
        batch the model refused."""
        if hint is None:
            self._rows([NO_BATCH], [item.key], [item.index], [item.label], [None], [item.reason])
        else:
            reason = item.reason[: len(item.reason) - len(hint)]
            self._rows([REFUSED], [item.key], [item.index], [item.label], [None], [reason])

    def featured(self, item: Featured, shape: Any) -> None:
        """A batch the model took; `shape` its per-sample input shape."""
        if item.kept is None:  # params mode, or a float64 head: no closed form from float32
            self.whole = False
        if not self.whole or item.kept is None:
            return
        h, logits = item.kept
        self.bytes += (h.numel() + logits.numel()) * 4
        if self.bytes > self.limit:  # more than may be written: drop it, keep memory bounded
            self.whole, self.h, self.logits = False, [], []
            return
        self.shape = shape if self.shape is None else self.shape
        batch, n = item.batch, len(item.batch.keys)
        self._rows([self.batches] * n, batch.keys, batch.indices, batch.y.tolist(),
                   batch.digests, [None] * n)  # fmt: skip
        self.batches += 1
        self.h.append(h.cpu().numpy())
        self.logits.append(logits.cpu().numpy())

    def _rows(self, *values: list) -> None:
        for column, vals in zip(self.columns.values(), values, strict=True):
            column.extend(vals)

    def table(self, meta: bytes) -> pa.Table:
        cols: dict[str, Any] = {
            "batch": pa.array(self.columns["batch"], pa.int32()),
            "key": pa.array(self.columns["key"], pa.string()),
            "index": pa.array(self.columns["index"], pa.int64()),
            "label": pa.array(self.columns["label"], pa.int64()),
            "digest": pa.array(self.columns["digest"], pa.int64()),
            "reason": pa.array(self.columns["reason"], pa.string()),
        }
        if self.h:  # h and logits per row, zeros for skipped samples
            rows = np.asarray(self.columns["batch"]) >= 0
            for name, parts in (("h", self.h), ("logits", self.logits)):
                values = np.concatenate(parts)
                if not rows.all():
                    values, taken = np.zeros((len(rows), values.shape[1]), np.float32), values
                    values[rows] = taken
                flat = pa.array(values.reshape(-1))
                cols[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        shape = json.dumps(self.shape).encode()
        return pa.table(cols).replace_schema_metadata({META_KEY: meta, SHAPE_KEY: shape})


class Keeper:
    """Pass 1's writer of kept files, within `budget` bytes (this unit's share)."""

    def __init__(self, ctx: StageContext, budget: int):
        self.ctx, self.left = ctx, budget

    def record(self, ref: ShardRef) -> ShardRecord | None:
        """A record for the shard about to stream, or None once the budget is spent."""
        if self.left <= 0 or self.ctx.cfg.grad != "last-layer":
            return None
        return ShardRecord(ref, self.left)

    def finish(self, record: ShardRecord) -> None:
        """The shard's stream ended whole: write its file if it all replays and fits. A
        write that fails (a full disk, a store's refusal) stops keeping; the run goes on."""
        if not record.whole or len(record.columns["key"]) < MIN_SAMPLES:
            return
        table = record.table(_meta(self.ctx, record.ref))
        if table.nbytes > self.left:
            self.left = 0  # later shards would not fit either, most likely: stop keeping
            return
        self.left -= table.nbytes
        try:
            with self.ctx.out.writer(kept_url(self.ctx, record.ref)) as f:
                pq.write_table(table, f, compression="none", use_dictionary=False)
        except (OSError, SageError) as exc:
            log.warning("pass 1: cannot keep features for pass 2 (%s); pass 2 reads the rest "
                        "of the shards again", exc)  # fmt: skip
            self.left = 0


def kept_names(ctx: StageContext) -> set[str]:
    """The names of the shards with a kept file (one listing of OUT/_work/kept/; none if the
    store refuses it: then every shard is read)."""
    try:
        return {n.removesuffix(".parquet") for n in ctx.out.names(ctx.out.work(KEPT))}
    except (OSError, SageError) as exc:
        log.warning("pass 2: cannot list %s (%s); reading every shard", ctx.out.work(KEPT), exc)
        return set()


def kept_batches(ctx: StageContext, ref: ShardRef) -> Iterator[Batch | Skipped] | None:
    """The shard's batches and skipped samples as pass 1 streamed them, each batch's inputs a
    `HeadIO`; None if its file is missing or was not made by this run. The file is removed
    once the last batch has been taken."""
    url, options = kept_url(ctx, ref), ctx.out.storage_options
    try:
        if ref.pin is not None and pin_of(ref.url, options) != ref.pin:
            return None  # the shard changed: reading it says so, as it would have
        table = read_table(url, storage_options=options)
        meta = table.schema.metadata or {}
        shape = json.loads(meta[SHAPE_KEY])
    except Exception as exc:  # noqa: BLE001 - absent, cut short, any store's error: read it
        log.debug("pass 2: %s is not replayable (%s); reading %s", url, exc, ref.url)
        return None
    if meta.get(META_KEY) != _meta(ctx, ref):
        log.info("pass 2: %s was kept by another run; reading %s again", url, ref.url)
        return None
    return _replay(ctx, table, url, tuple(shape) if isinstance(shape, list) else shape)


def _replay(ctx: StageContext, table: pa.Table, url: str, shape: Any
            ) -> Iterator[Batch | Skipped]:  # fmt: skip
    cols = {name: table[name].to_pylist() for name in ("key", "index", "label", "digest",
                                                        "reason")}  # fmt: skip
    batch = table["batch"].to_numpy()
    arrays = {}
    for name in ("h", "logits"):
        if name in table.column_names:
            column = table[name].combine_chunks()
            arrays[name] = column.flatten().to_numpy().reshape(len(column), -1)
    start = 0
    while start < len(batch):
        if batch[start] < 0:  # the hint as reading the shard here would give it, now
            hint = fit_hint(ctx) if batch[start] == REFUSED else ""
            yield Skipped(cols["key"][start], cols["index"][start], cols["reason"][start] + hint,
                          cols["label"][start])  # fmt: skip
            start += 1
            continue
        stop = start + 1
        while stop < len(batch) and batch[stop] == batch[start]:
            stop += 1
        rows = slice(start, stop)
        h, logits = (torch.tensor(arrays[name][rows]) for name in ("h", "logits"))
        x = HeadIO(h, logits, shape)
        y = torch.tensor(cols["label"][rows], dtype=torch.int64)
        # a HeadIO for inputs: loop._featurize replays it instead of running the model
        yield Batch(cols["key"][rows], cols["index"][rows], cast(Any, x), y, cols["digest"][rows])
        start = stop
    try:
        ctx.out.remove(url)
    except (OSError, SageError) as exc:  # it goes with OUT/_work/ when the run succeeds
        log.debug("pass 2: cannot remove %s yet: %s", url, exc)
