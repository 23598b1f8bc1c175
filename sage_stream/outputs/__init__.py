"""Everything under OUT, with one owner per name (`folder.OutputFolder`).

folder         OutputFolder: the names under OUT, retried reads and writes, claim,
               _SUCCESS, temporaries, checkpoints
identity       the sketch identity and the run identity, defined once
sketch_store   sketch.zarr: basis, singular values, consensus, class counts, projections
tables         scores/part-<shard>.parquet
selection_file selection.parquet: one row group per shard, read per shard
manifest       manifest.json, shardindex.json, and the commit that ends with _SUCCESS
"""

from .folder import OutputFolder

__all__ = ["OutputFolder"]
