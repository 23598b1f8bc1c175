"""sage-stream: keep the training samples whose gradients agree with their class.

The flow, one module per step (see README.md):

    storage             fsspec access: retries, bounded resumable reads, atomic writes
    urls, formats/      expand inputs; read shards (tar | parquet) -> Sample
    decode, batches     Sample -> (input tensor, label) batches
    gradients           per-sample gradient features g_i (last-layer | params, projection)
    sketch              pass 1: Frequent Directions sketch of the g_i    -> store (sketch.zarr)
    scores              pass 2: agreement of each g_i with its class      -> tables (scores/)
    selection           keep fraction / quotas / threshold                -> selection.parquet
    emit                kept samples byte for byte                        -> shards/, manifest
    report/             after emit: HTML page + figures of a finished run -> OUT/report/
    feed                training feed: only the kept samples, per worker and node
    passes/             the shard loops that drive pass 1 and pass 2
    api, cli            sketch / score / select / emit / run
"""

from .api import emit, run, score, select, sketch
from .errors import InputError, MismatchError, SageError, SampleError, ShardError
from .sample import Sample, ShardRef

__version__ = "0.1.0"
__all__ = [
    "InputError",
    "MismatchError",
    "SageError",
    "Sample",
    "SampleError",
    "ShardError",
    "ShardRef",
    "emit",
    "run",
    "score",
    "select",
    "sketch",
]
