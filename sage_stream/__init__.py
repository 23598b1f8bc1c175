"""sage-stream: keep the training samples whose gradients agree with their class.

The flow, one package (or module) per step; README.md's "Layout" names every module:

    storage/            the edge: fsspec access with retries, resumable reads, atomic writes
    inputs, formats/    INPUT... -> shards; read shards (tar | parquet) -> Sample
    decode/             Sample -> (input tensor, label) batches; bad samples -> recorded skips
    gradients/          the proxy model; per-sample gradient features (+ projection)
    fd                  Frequent Directions, the sketch of pass 1 (pure tensor code)
    scores              agreement and coverage of each gradient (pure)
    select/             which samples to keep: rules, quotas, orderings, the bounded path
    passes/             the shard loop, and pass 1, pass 2, select and emit over it
    outputs/            everything under OUT: the folder, identity, sketch store, tables,
                        manifest
    executors/          where the passes run: local, or Ray
    api, cli            sketch / score / select / emit / run; inspect, report, demo
    feed/, report/      after the run: the training feed; the HTML report
"""

from .api import RunResult, SelectResult, emit, run, score, select, sketch
from .config import Config
from .errors import (
    InputError,
    MismatchError,
    OutputExistsError,
    OutputLockedError,
    SageError,
    SampleError,
    ShardError,
    StorageError,
)
from .passes.emit import EmitResult
from .passes.score import ScoreResult
from .passes.sketch import SketchResult
from .sample import Sample, ShardRef

__version__ = "0.1.0"
__all__ = [
    "Config",
    "EmitResult",
    "InputError",
    "MismatchError",
    "OutputExistsError",
    "OutputLockedError",
    "RunResult",
    "SageError",
    "Sample",
    "SampleError",
    "ScoreResult",
    "SelectResult",
    "ShardError",
    "ShardRef",
    "SketchResult",
    "StorageError",
    "emit",
    "run",
    "score",
    "select",
    "sketch",
]
