"""The scorers' orderings: each candidate's ranking value, higher kept first.

Where it sits: both selection paths turn a table of score rows (the whole table, or one part)
into ranking values here, then keep from the top. Every value is a function of its own row (and,
for sage-coverage, of data-wide parameters the bounded path adds as columns first), so a
part can be ranked alone and the result does not depend on row order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..errors import InputError
from .content import draw_bits, unit_floats
from .coverage import Filter, coverage_ranking
from .rules import SCORERS, check_choice, check_columns, ok_mask

# The scores/ column each scorer ranks by (random needs none: it hashes shard and key).
SOURCE = {"sage": "score", "loss": "loss", "loss-easy": "loss", "grad-norm": "grad_norm"}


def ranking_values(
    table: pa.Table, scorer: str, seed: int = 0, found: Filter | None = None
) -> np.ndarray:
    """Per-row ranking value (float64, shape ``(len(table),)``); higher is kept first.

    ``sage-coverage`` → agreement filters, ridge leverage draws (``coverage.coverage_ranking``);
    ``sage`` → score; ``loss`` → loss (hardest first); ``loss-easy`` → −loss; ``grad-norm`` →
    grad_norm; ``random`` → a value in [0, 1) from the seed and the sample's content digest
    (``content.draw_bits``; shard and key for rows without one), so
    it depends neither on row order nor on which other rows exist. Rows that are not candidates
    may come back NaN; a candidate without the needed value is an InputError. `found`:
    sage-coverage's filter of this table (coverage.row_filter), where the caller has it.
    """
    check_choice("scorer", scorer, SCORERS)
    if scorer == "random":
        check_columns(table, ("__key__", "__shard__"))
        return random_values(table, seed)
    if scorer == "sage-coverage":
        check_columns(table, ("status",))
        return coverage_ranking(table, ok_mask(table), seed, found=found)
    column = SOURCE[scorer]
    check_columns(table, ("status", column))
    values = table[column].cast(pa.float64()).to_numpy(zero_copy_only=False)
    if np.isnan(values[ok_mask(table)]).any():
        raise InputError(
            f"scorer {scorer!r} needs column {column!r} on every scored row; some are null or NaN"
        )
    return -values if scorer == "loss-easy" else values


def recorded_score(values: np.ndarray, scorer: str) -> np.ndarray:
    """selection.parquet's `score`: the value ranked on, but the loss itself for loss-easy."""
    return -values if scorer == "loss-easy" else values


def random_values(table: pa.Table, seed: int) -> np.ndarray:
    """[0, 1) per row from its draw bits (content.py): order-independent, exact float64s."""
    return unit_floats(draw_bits(table, seed, "random", with_shard=True))
