"""Where things are, for tests that start subprocesses or Ray workers (which need the helpers
on their PYTHONPATH, so that `--model tiny:mlp` imports there too)."""

from pathlib import Path

HELPERS = Path(__file__).resolve().parent
ROOT = HELPERS.parents[1]  # the repository


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: the helpers first on PYTHONPATH, then whatever
    the test itself runs with (so that the child imports the same sage_stream)."""
    import os

    path = os.pathsep.join(p for p in (str(HELPERS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def ray_runtime_env() -> dict:
    """The runtime_env of the tests' Ray jobs: the helpers (`tiny:mlp`, the decoders) and
    tests/executors (test_ray, for a driver in a subprocess) import on the workers."""
    import os

    parts = (str(HELPERS.parent / "executors"), str(HELPERS), os.environ.get("PYTHONPATH"))
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in parts if p)}}
