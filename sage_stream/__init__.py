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

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

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
from .sample import Sample, ShardRef

if TYPE_CHECKING:  # what the names below are, for type checkers and IDEs
    from .api import RunResult, SelectResult, emit, run, score, select, sketch
    from .config import Config
    from .passes.emit import EmitResult
    from .passes.score import ScoreResult
    from .passes.sketch import SketchResult

# Imported on first use, so that `import sage_stream.cli`, `--help` and `inspect` do not start
# torch (importing the steps loads the model code).
_LAZY = {
    "Config": ".config",
    "EmitResult": ".passes.emit",
    "RunResult": ".api",
    "ScoreResult": ".passes.score",
    "SelectResult": ".api",
    "SketchResult": ".passes.sketch",
    "emit": ".api",
    "run": ".api",
    "score": ".api",
    "select": ".api",
    "sketch": ".api",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sage_stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`sage_stream.select` is the public function (api.select); importing the `select`
    package (sage_stream/select/) must not replace it with the package, as Python's import
    system would when it binds a subpackage to its parent's attribute of the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "select" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

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
