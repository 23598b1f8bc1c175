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
from ..outputs.tables import read_table
from ..sample import ShardRef

if TYPE_CHECKING:
    from .loop import Featured, StageContext

log = logging.getLogger("sage_stream")
KEPT = "kept"  # the folder under OUT/_work/
FORMAT = 1  # the layout below; another one is not replayed
META_KEY = b"sage_stream.kept"
NO_BATCH = -1  # the batch column of a skipped sample
# A shard of fewer samples is read again instead: its file costs more than it saves. Writing,
# listing, reading and removing one file took about 3 CPU ms here; replaying a sample instead
# of reading, decoding and running the benchmark's MLP on it saved about 75 us (§8 of
# docs/benchmarks.md), so the break-even is some 40 samples, and more with a larger model.
MIN_SAMPLES = 64


@dataclass
class HeadIO:
    """The inputs of a replayed batch, in place of the decoded ones: (B, H) and (B, C) float32."""

    h: torch.Tensor
    logits: torch.Tensor


def kept_url(ctx: StageContext, ref: ShardRef) -> str:
    return ctx.out.work(KEPT, f"{ref.name}.parquet")


def _meta(ctx: StageContext, ref: ShardRef) -> bytes:
    """What a kept file must have been made with to be replayed in this run."""
    what = {"format": FORMAT, "sketch": ctx.identity(), "url": ref.url, "pin": ref.pin,
            "batch_size": ctx.cfg.batch_size}  # fmt: skip
    return json.dumps(what, sort_keys=True).encode()


class ShardRecord:
    """One shard's items as pass 1 streams them; `whole` until one cannot be replayed."""

    def __init__(self, ref: ShardRef):
        self.ref = ref
        self.whole = True
        self.batches = 0
        self.columns: dict[str, list] = {c: [] for c in ("batch", "key", "index", "label",
                                                         "digest", "reason")}  # fmt: skip
        self.h: list[np.ndarray] = []  # (B, H) per batch, or None per skipped sample
        self.logits: list[np.ndarray] = []

    def skipped(self, item: Skipped) -> None:
        self._rows([NO_BATCH], [item.key], [item.index], [item.label], [None], [item.reason])

    def featured(self, item: Featured) -> None:
        if item.kept is None:  # params mode, or a float64 head: no closed form from float32
            self.whole = False
            return
        batch, n = item.batch, len(item.batch.keys)
        self._rows([self.batches] * n, batch.keys, batch.indices, batch.y.tolist(),
                   batch.digests, [None] * n)  # fmt: skip
        self.batches += 1
        h, logits = item.kept
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
            rows = np.asarray(self.columns["batch"]) != NO_BATCH
            for name, parts in (("h", self.h), ("logits", self.logits)):
                values = np.zeros((len(rows), parts[0].shape[1]), dtype=np.float32)
                values[rows] = np.concatenate(parts)
                flat = pa.array(values.reshape(-1))
                cols[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        return pa.table(cols).replace_schema_metadata({META_KEY: meta})


class Keeper:
    """Pass 1's writer of kept files, within `budget` bytes (this unit's share)."""

    def __init__(self, ctx: StageContext, budget: int):
        self.ctx, self.left = ctx, budget

    def record(self, ref: ShardRef) -> ShardRecord | None:
        """A record for the shard about to stream, or None once the budget is spent."""
        return ShardRecord(ref) if self.left > 0 and self.ctx.cfg.grad == "last-layer" else None

    def finish(self, record: ShardRecord) -> None:
        """The shard's stream ended whole: write its file if it all replays and fits."""
        if not record.whole or len(record.columns["key"]) < MIN_SAMPLES:
            return
        table = record.table(_meta(self.ctx, record.ref))
        if table.nbytes > self.left:
            self.left = 0  # later shards would not fit either, most likely: stop keeping
            return
        self.left -= table.nbytes
        with self.ctx.out.writer(kept_url(self.ctx, record.ref)) as f:
            pq.write_table(table, f, compression="none", use_dictionary=False)


def kept_names(ctx: StageContext) -> set[str]:
    """The names of the shards with a kept file (one listing of OUT/_work/kept/)."""
    return {n.removesuffix(".parquet") for n in ctx.out.names(ctx.out.work(KEPT))}


def kept_batches(ctx: StageContext, ref: ShardRef) -> Iterator[Batch | Skipped] | None:
    """The shard's batches and skipped samples as pass 1 streamed them, each batch's inputs a
    `HeadIO`; None if its file is missing or was not made by this run. The file is removed
    once the last batch has been taken."""
    url = kept_url(ctx, ref)
    try:
        table = read_table(url, storage_options=ctx.out.storage_options)
    except (OSError, pa.ArrowException, ValueError) as exc:  # absent, cut short: read the shard
        log.debug("pass 2: %s is not replayable (%s); reading %s", url, exc, ref.url)
        return None
    if (table.schema.metadata or {}).get(META_KEY) != _meta(ctx, ref):
        log.info("pass 2: %s was kept by another run; reading %s again", url, ref.url)
        return None
    return _replay(ctx, table, url)


def _replay(ctx: StageContext, table: pa.Table, url: str) -> Iterator[Batch | Skipped]:
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
        if batch[start] == NO_BATCH:
            yield Skipped(cols["key"][start], cols["index"][start], cols["reason"][start],
                          cols["label"][start])  # fmt: skip
            start += 1
            continue
        stop = start + 1
        while stop < len(batch) and batch[stop] == batch[start]:
            stop += 1
        rows = slice(start, stop)
        x = HeadIO(*(torch.tensor(arrays[name][rows]) for name in ("h", "logits")))
        y = torch.tensor(cols["label"][rows], dtype=torch.int64)
        # a HeadIO for inputs: loop._featurize replays it instead of running the model
        yield Batch(cols["key"][rows], cols["index"][rows], cast(Any, x), y, cols["digest"][rows])
        start = stop
    ctx.out.remove(url)
