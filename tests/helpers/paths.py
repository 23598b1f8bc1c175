"""Where things are, for tests that start subprocesses or Ray workers (which need the helpers
on their PYTHONPATH, so that `--model tiny:mlp` imports there too)."""

from pathlib import Path

HELPERS = Path(__file__).resolve().parent
ROOT = HELPERS.parents[1]  # the repository
