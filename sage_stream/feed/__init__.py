"""Training feed: the kept samples of a run, streamed into a training loop (after EMIT).

Two sources give one and the same stream of samples:

- **emitted**: ``OUT/shards/*`` as listed by ``OUT/manifest.json`` (or ``shardindex.json``, or
  the folder); each sample's score record is its ``<key>.sage.json`` member or ``sage_*``
  columns, moved into ``sample["sage"]``.
- **original**: the input shards (``manifest.json`` ``inputs[].url``, or given) filtered by
  ``OUT/selection.parquet``; no data is rewritten. The record is built from ``scores/`` exactly
  as emit builds it, so both sources yield equal samples.

A sample is a webdataset-style dict: ``__key__``, ``__url__``, ``__shard__``, the fields (raw
member bytes for tar, column values for Parquet) and ``sage`` = ``{score, label, loss,
grad_norm, energy, scorer}``. ``filter_selected`` and ``attach_scores`` are the same steps as
plain webdataset stages. ``SelectedDataset`` splits shards over nodes and DataLoader workers
so that every kept sample comes out exactly once per epoch across all of them.
"""

from .dataset import DecodeScored, SelectedDataset, assigned, node_of
from .plan import FeedPlan, FeedShard, plan_feed
from .stages import (
    attach_scores,
    filter_selected,
    kept_records,
    ranked_score,
    selected_samples,
    shard_samples,
)

__all__ = [
    "DecodeScored",
    "FeedPlan",
    "FeedShard",
    "SelectedDataset",
    "assigned",
    "attach_scores",
    "filter_selected",
    "kept_records",
    "node_of",
    "plan_feed",
    "ranked_score",
    "selected_samples",
    "shard_samples",
]
