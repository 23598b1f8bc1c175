"""Where things are, for tests that start subprocesses or Ray workers (which need the helpers
on their PYTHONPATH, so that `--model tiny:mlp` imports there too)."""

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

HELPERS = Path(__file__).resolve().parent
ROOT = HELPERS.parents[1]  # the repository


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: the helpers first on PYTHONPATH, then whatever
    the test itself runs with (so that the child imports the same sage_stream)."""
    return {**os.environ, "PYTHONPATH": _pythonpath(HELPERS), **extra}


def ray_runtime_env() -> dict:
    """The runtime_env of the tests' Ray jobs: the helpers (`tiny:mlp`, the decoders) and
    tests/executors (test_ray, for a driver in a subprocess) import on the workers."""
    return {"env_vars": {"PYTHONPATH": _pythonpath(HELPERS.parent / "executors", HELPERS)}}


def _pythonpath(*first: Path) -> str:
    """`first`, then the PYTHONPATH the tests run with."""
    parts = (*map(str, first), os.environ.get("PYTHONPATH"))
    return os.pathsep.join(p for p in parts if p)


@contextlib.contextmanager
def environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """This process's environment with `values` set (None: removed) for the block, then as it
    was."""
    saved = {name: os.environ.get(name) for name in values}
    _set(values)
    try:
        yield
    finally:
        _set(saved)


def _set(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
