"""Why each sample was kept or not: one decision per scores row, with the numbers that decided it.

Where it sits: bounded.py's write pass, which decides each part's kept rows, asks here for the
part's decisions (`decide_part`); passes/select.py writes them into ``OUT/decisions.parquet``
(a row group per shard, in the scores part's row order; outputs/decisions_file.py) and adds up
a `Tally` per class for its summary. Nothing is held beyond one part and C × decisions counts.

A row's decision is the first that applies of:

    error       status error: never a candidate
    kept        in selection.parquet
    duplicate   --dedup on: a near-copy of ``duplicate_of_key`` (ranked after its class)
    other_class sage-coverage: its signature is nearer another class's mean (``nearer_class``)
                than its own: ``class_margin`` below 0, set aside as likely mislabelled
    agreement   sage-coverage without signatures: agreement below its class's
                ``agreement_cut``, set aside
    coverage    sage-coverage without signatures: ridge leverage τ over ``coverage_cap``
                (these three, and their numbers, are coverage.SET_ASIDE, FILTER_COLUMNS and
                ROW_COLUMNS)
    min_score   --min-score: its value is below the threshold (``cut``)
    below_cut   ranked after its class's cut (value, then key and shard: ties by name)

``value`` is the ranking value as selection.parquet records it (the loss itself for
loss-easy, which keeps the lowest); ``cut`` is that of its class's last kept row (or the
threshold with --min-score; null where the class keeps none). The filter's numbers come from
coverage.row_filter, the same function the ranking uses, so they cannot disagree with it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .classmeans import by_class
from .coverage import FILTER_COLUMNS, ROW_COLUMNS, SET_ASIDE, row_filter
from .dedup import DUPLICATE
from .orderings import recorded_score
from .parts import Rows, group_of
from .rules import ok_mask

if TYPE_CHECKING:
    from .dedup import Duplicates

DECISIONS = ("kept", "below_cut", *SET_ASIDE, "duplicate", "min_score", "error")
DECISION_SCHEMA = pa.schema(
    [
        ("__key__", pa.string()),
        ("__shard__", pa.string()),
        ("label", pa.int64()),
        ("kept", pa.bool_()),
        ("decision", pa.string()),
        ("value", pa.float64()),  # the ranking value (selection.parquet's score); null: error
        ("cut", pa.float64()),  # its class's cut value, or the --min-score threshold
        # sage-coverage's filter (coverage.FILTER_COLUMNS, ROW_COLUMNS): without signatures
        # its class's lowest passing agreement and the τ cap (null where the class is exempt);
        # with them the row's class margin and the nearest other class; null for other scorers
        *((name, pa.float64()) for name in (*FILTER_COLUMNS, *ROW_COLUMNS)),
        ("duplicate_of_key", pa.string()),  # --dedup on: the sample it nearly copies
        ("duplicate_of_shard", pa.string()),
    ]
)
# Columns of one value per sample (a key, a ranking value, a margin): Parquet writes them plain.
# Dictionary encoding them first builds a dictionary of every value, then falls back to plain
# pages at its size limit: two thirds of the write's CPU for a larger file (10^6 rows: 0.34 s
# and 28 MB, against 0.12 s and 22 MB; the same table read back).
PER_SAMPLE = ("__key__", "value", "class_margin", "duplicate_of_key")
DICTIONARY_COLUMNS = [name for name in DECISION_SCHEMA.names if name not in PER_SAMPLE]


def decide_part(
    table: pa.Table,
    rows: Rows,
    kept: np.ndarray,
    *,
    scorer: str,
    cuts: dict[int | None, float | None] | None,
    min_score: float | None,
    duplicates: Duplicates | None = None,
) -> pa.Table:
    """DECISION_SCHEMA rows for every row of `table` (one scores part, as the write pass got
    it), in its order. `rows` are its candidates (parts.prepare), `kept` their mask, `scorer`
    the one ranked by, `cuts` each class's cut value (recorded form; None key: balance none)."""
    n = table.num_rows
    at = np.flatnonzero(ok_mask(table))  # the candidates' positions (prepare keeps the order)
    code = {d: i for i, d in enumerate(DECISIONS)}  # decisions as codes until the column
    decision = np.full(n, code["error"], dtype=np.int32)
    mine = np.where(kept, code["kept"], code["min_score" if min_score is not None else "below_cut"])
    numbers = {name: np.full(n, np.nan) for name in (*FILTER_COLUMNS, *ROW_COLUMNS)}
    if scorer == "sage-coverage" and min_score is None:  # its filter's verdict and numbers
        f = rows.filter or row_filter(rows.table, np.ones(len(at), dtype=bool))
        for reason in SET_ASIDE:
            mine = np.where(~kept & f.set_aside(reason), code[reason], mine)
        numbers = {
            name: _spread(f.numbers[name], at, n) for name in (*FILTER_COLUMNS, *ROW_COLUMNS)
        }
    if DUPLICATE in rows.table.column_names:
        dup = rows.table[DUPLICATE].to_numpy(zero_copy_only=False).astype(bool)
        mine = np.where(~kept & dup, code["duplicate"], mine)
    decision[at] = mine
    value = _spread(recorded_score(rows.values, scorer), at, n)
    columns: dict[str, Any] = {
        "__key__": table["__key__"], "__shard__": table["__shard__"],
        "label": table["label"].cast(pa.int64()),
        "kept": pa.array(_spread(kept.astype(np.float64), at, n) == 1.0),
        "decision": pa.DictionaryArray.from_arrays(decision, DECISIONS).cast(pa.string()),
        "value": _floats(value), "cut": _floats(_cut_values(rows, at, n, scorer, cuts, min_score)),
        **{name: _floats(v) for name, v in numbers.items()},
    }  # fmt: skip
    columns.update(_duplicate_of(table, duplicates))
    return pa.table(columns).cast(DECISION_SCHEMA)


def _spread(values: np.ndarray, at: np.ndarray, n: int) -> np.ndarray:
    """(n,) float64: `values` at the candidates' positions, NaN elsewhere (error rows)."""
    out = np.full(n, np.nan)
    out[at] = values
    return out


def _floats(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float64(), mask=np.isnan(values))


def _cut_values(rows: Rows, at: np.ndarray, n: int, scorer: str,
                cuts: dict[int | None, float | None] | None,
                min_score: float | None) -> np.ndarray:  # fmt: skip
    if min_score is not None:  # the threshold is on the ranking value: recorded as the value is
        return _spread(np.full(len(at), recorded_score(np.array([min_score]), scorer)[0]), at, n)
    assert cuts is not None  # a keep selection has cuts (bounded.kept_part's branch)
    labels = list(cuts)
    group = group_of(rows, labels)
    value = np.array([np.nan if v is None else v for v in cuts.values()], dtype=np.float64)
    return _spread(np.where(group >= 0, value[np.maximum(group, 0)], np.nan), at, n)


def _duplicate_of(table: pa.Table, duplicates: Duplicates | None) -> dict[str, pa.Array]:
    """The sample each row nearly copies (null for the rest), from the duplicates found."""
    key = pa.nulls(table.num_rows, pa.string())
    shard = pa.nulls(table.num_rows, pa.string())
    if duplicates is not None and table.num_rows:
        for name in pc.unique(table["__shard__"]).drop_null().to_pylist():
            of = duplicates.of_shard(name)
            if not of.num_rows:
                continue
            keys = table["__key__"]
            hit = pc.index_in(keys, value_set=of["__key__"].combine_chunks())
            hit = pc.if_else(pc.equal(table["__shard__"], name), hit, pa.scalar(None, hit.type))
            if isinstance(hit, pa.ChunkedArray):
                hit = hit.combine_chunks()
            key = pc.coalesce(key, of["duplicate_of_key"].combine_chunks().take(hit))
            shard = pc.coalesce(shard, of["duplicate_of_shard"].combine_chunks().take(hit))
    return {"duplicate_of_key": key, "duplicate_of_shard": shard}


@dataclass
class Tally:
    """Per class (label; None: no label) the count of each decision and the data-wide numbers,
    added up part by part on the driver (decisions.parquet's summary)."""

    counts: dict[int | None, Counter] = field(default_factory=dict)
    numbers: dict[int | None, dict[str, float | None]] = field(default_factory=dict)

    def add(self, part: pa.Table) -> None:
        """One part's decisions (DECISION_SCHEMA), in numpy: a part of a few rows costs
        microseconds, so a select over many small shards pays little for its decisions."""
        if not part.num_rows:  # an empty shard
            return
        labels, nulls = _labels(part["label"])
        codes = pc.index_in(part["decision"], value_set=pa.array(DECISIONS)).to_numpy(
            zero_copy_only=False
        )  # (n,) position in DECISIONS (decide_part writes no other)
        classes, inverse, _ = by_class(labels)
        per = np.bincount(inverse * len(DECISIONS) + codes,
                          minlength=len(classes) * len(DECISIONS)).reshape(len(classes), -1)  # fmt: skip
        names = [None if nulls and c == NULL_LABEL else int(c) for c in classes.tolist()]
        for label, row in zip(names, per.tolist(), strict=True):
            counts = self.counts.setdefault(label, Counter())
            counts.update({DECISIONS[j]: n for j, n in enumerate(row) if n})
        scored = np.flatnonzero(pc.is_valid(part["value"]).to_numpy(zero_copy_only=False))
        first = np.full(len(classes), len(scored))  # each class's first scored row
        first[inverse[scored][::-1]] = np.arange(len(scored) - 1, -1, -1)  # the first of equals
        for i in scored[first[first < len(scored)]].tolist():  # constant in a class: any row
            self.numbers[names[inverse[i]]] = {k: _value(part[k][i].as_py()) for k in
                                               ("cut", *FILTER_COLUMNS)}  # fmt: skip

    def summary(self, request: dict[str, Any], scorer: str) -> dict[str, Any]:
        """The summary: the request, and per class its decisions and numbers."""
        classes = []
        for label in sorted(self.counts, key=lambda c: (c is None, c or 0)):
            counts = self.counts[label]
            numbers = self.numbers.get(label, {})
            entry: dict[str, Any] = {"label": label, "rows": sum(counts.values()),
                                     "kept": counts.get("kept", 0), "cut": _json(numbers.get("cut"))}  # fmt: skip
            filtered = any(numbers.get(k) is not None for k in FILTER_COLUMNS)  # τ rule
            if scorer == "sage-coverage" and request.get("min_score") is None and filtered:
                entry.update({k: _json(numbers.get(k)) for k in FILTER_COLUMNS})
            entry["decisions"] = {d: counts[d] for d in DECISIONS if counts.get(d)}
            classes.append(entry)
        totals = Counter()  # type: Counter[str]
        for counts in self.counts.values():
            totals.update(counts)
        return {"selection": request, "ranked_by": scorer, "classes": classes,
                "totals": {d: totals[d] for d in DECISIONS if totals.get(d)}}  # fmt: skip


NULL_LABEL = np.iinfo(np.int64).min  # a null label while counting (labels are int64)


def _labels(column: pa.ChunkedArray) -> tuple[np.ndarray, bool]:
    """(n,) int64 labels, NULL_LABEL where null, and whether any is null."""
    nulls = column.null_count > 0
    filled = pc.fill_null(column, NULL_LABEL) if nulls else column
    return filled.to_numpy(zero_copy_only=False).astype(np.int64), nulls


def _value(value: float | None) -> float | None:
    return None if value is None or value != value else value  # NaN: none


def _json(value: float | None) -> float | str | None:
    """A float JSON can hold: ±inf (a near-copy's value) as a string."""
    if value is None or np.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"
