"""Reading back what a run wrote, for comparisons between runs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sage_stream.outputs.tables import SCORE_SCHEMA
from sage_stream.select.rules import COLUMNS as SELECT_COLUMNS

# The columns of scores/ that selection reads (sage-coverage's too), for tables that tests make
# by hand.
SCORES_SCHEMA = pa.schema([SCORE_SCHEMA.field(name) for name in [*SELECT_COLUMNS, "coverage"]])


def output_files(out: Path) -> dict[str, bytes]:
    """Every file under `out`, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_same_outputs(a: Path, b: Path) -> None:
    """Every file byte for byte, manifest.json included (it records what, not how)."""
    first, second = output_files(a), output_files(b)
    assert first.keys() == second.keys()
    differ = [n for n in first if first[n] != second[n]]
    assert differ == [], f"these files differ: {differ}"


def kept_keys(out: Path) -> set[str]:
    return set(pq.read_table(out / "selection.parquet", columns=["__key__"])["__key__"].to_pylist())
