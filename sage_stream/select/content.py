"""What the seeded draws (`random`, `sage-coverage`) are keyed by: a sample's content.

Where it sits: `orderings.random_values` and `coverage.gumbel_noise` hash the seed with the id
given here. A row with a content digest (scores/ column `digest`, pass 2's
`batches.content_digest` of the decoded input and label) is drawn by it, so the same samples
get the same draw whether they came as tar or Parquet, with or without a key column, in any
shards. A row without one (scores written before the column existed, or a sample that did not
decode, which is never drawn) keeps the id it had before: the key (and the shard, for random).
"""

from __future__ import annotations

import pyarrow as pa

DIGEST = "digest"


def draw_ids(table: pa.Table, with_shard: bool) -> list[str]:
    """One id per row: ``digest\\0<d>``, else ``<shard>\\0<key>`` (with_shard) or ``<key>``."""
    keys = table["__key__"].to_pylist()
    shards = table["__shard__"].to_pylist() if with_shard else [None] * len(keys)
    digests = table[DIGEST].to_pylist() if DIGEST in table.column_names else [None] * len(keys)
    return [
        f"digest\0{d}" if d is not None else (f"{s}\0{k}" if with_shard else k)
        for d, s, k in zip(digests, shards, keys, strict=True)
    ]
