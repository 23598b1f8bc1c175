"""The select step: ``OUT/scores/`` → ``OUT/selection.parquet``, in bounded memory.

Where it sits: after pass 2 (score.py), before emit (emit.py). What is kept is decided by the
`select` package (rules, quotas, orderings, the bounded path over the score parts); this step
is its I/O: it reads the parts through the output folder, checks that they can serve the
scorer, logs and records the selection's warnings (select/warn.py), and writes the selection
and every row's decision (outputs/decisions_file.py), one shard at a time, changing OUT only
once the search is over and the lease still held.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from ..errors import InputError
from ..outputs import decisions_file
from ..outputs.folder import OutputFolder
from ..outputs.lease import check as check_lease
from ..outputs.selection_file import write_selection_parts
from ..outputs.tables import read_part
from ..select.batches import Batches
from ..select.bounded import select_units
from ..select.classmeans import SIGNATURE
from ..select.content import DIGEST
from ..select.decisions import Tally
from ..select.dedup import DUPLICATES_SCHEMA, Duplicates, find_duplicates
from ..select.parts import local_map
from ..select.rules import COLUMNS, SKETCHED, Rules, ok_mask
from ..select.warn import run_warnings

log = logging.getLogger("sage_stream")


@dataclass
class SelectResult:
    url: str
    scored: int
    kept: int
    params: dict[str, Any]
    warnings: list[str] = dataclasses.field(default_factory=list)  # see select/warn.py


def run_select(
    folder: OutputFolder, rules: Rules, shards: list[str], checkpoint: str | None
) -> SelectResult:
    """Select over the score parts of `shards` and write OUT/selection.parquet.

    `checkpoint` is the run's --checkpoint when OUT does not record one (for the warnings).
    """
    # numpy's BLAS on one thread: select's products are skinny (10^6 rows of 32 numbers times
    # 32), where OpenBLAS's threads cost 5x the CPU of one thread and take longer
    # (docs/benchmarks.md §8, s8); pyarrow's own thread pool is not a BLAS and is unaffected
    with threadpool_limits(1, user_api="blas"):
        return _run_select(folder, rules, shards, checkpoint)


def _run_select(
    folder: OutputFolder, rules: Rules, shards: list[str], checkpoint: str | None
) -> SelectResult:
    columns = [*COLUMNS, "coverage"] if rules.scorer == "sage-coverage" else COLUMNS
    if rules.dedups:
        columns = [*columns, "signature"]

    # the seeded draws are keyed by content where pass 2 recorded it (select/content.py);
    # sage-coverage's class means use the signatures where pass 2 recorded them (coverage.py)
    drawn = (DIGEST,) if rules.ranked_by in ("random", "sage-coverage") else ()
    signed = rules.ranked_by == "sage-coverage" and not rules.dedups

    def read(name: str) -> pa.Table:
        nonlocal signed
        try:
            table = read_part(
                folder, name, list(columns), (*drawn, SIGNATURE) if signed else drawn
            )[0]
        except (KeyError, pa.ArrowInvalid) as exc:  # a column this version's pass 2 writes
            raise InputError(
                f"the scores of shard {name!r} under {folder.url} lack a column this selection "
                f"needs ({exc}): they were made by an earlier version; rerun `sage-stream "
                "score` (or --dedup off, for the near-copy signature)"
            ) from None
        # one candidate without a signature, and the class-mean rule is off for every part
        # (coverage.CoverageSums.signed): the others' are not read (all null, as `--grad
        # params` writes them, they cost pyarrow more to read than the rest of the part)
        signed = signed and not _lacks_signatures(table)
        return table

    parts = Batches(read, shards)  # each part read once, joined in batches (select/batches.py)
    if rules.scorer in SKETCHED:
        _check_has_sage_scores(folder, shards, parts.part)
    params: dict[str, Any] = rules.params()
    recorded = folder.recorded_config() or {}
    warnings = run_warnings(rules.scorer, recorded.get("checkpoint", checkpoint), shards,
                            parts.part)  # fmt: skip
    for warning in warnings:
        log.warning("%s", warning)
    if warnings:  # recorded only when there are some: a sound run's selection is unchanged
        params["warnings"] = warnings
    with contextlib.ExitStack() as stack:
        dups = None
        if rules.dedups:  # found first: one pass for the stats, then bucket by bucket
            found = find_duplicates(shards, local_map(parts.part))  # part by part: float sums
            dups = stack.enter_context(Duplicates(found))
        result = _select_and_write(folder, rules, parts, params, dups)
    result.warnings = [*warnings, *result.warnings]
    return result


def _select_and_write(
    folder: OutputFolder,
    rules: Rules,
    parts: Batches,
    params: dict[str, Any],
    dups: Duplicates | None,
) -> SelectResult:
    chosen = select_units(parts.batches, parts.map, lambda b: b.names, keep=rules.keep,
                          balance=rules.balance, min_score=rules.min_score, scorer=rules.scorer,
                          seed=rules.seed, duplicates=dups)  # fmt: skip
    scored = 0
    tally = Tally()
    with contextlib.ExitStack() as stack:  # decisions.parquet is committed after the selection
        sinks: list[decisions_file.DecisionSink] = []

        def start() -> None:  # the search is over; from here on OUT changes
            check_lease(folder)  # a writer whose lease was broken stops before changing it
            folder.clear_success()  # only now: a refused select changes nothing
            sinks.append(stack.enter_context(decisions_file.writing(folder)))

        def counted() -> Iterator[tuple[str, pa.Table]]:
            nonlocal scored
            first = True
            for unit in chosen:
                if first:
                    start()
                    first = False
                tally.add(unit.decisions)  # once per batch of parts
                for part in unit.parts:
                    scored += part.candidates
                    sinks[0].write(part.shard, part.decisions)  # the same pass: no rows held
                    yield part.shard, part.kept
            if first:
                start()

        written = write_selection_parts(folder, counted(), params)
        _write_duplicates(folder, dups)
        sinks[0].summary = tally.summary(rules.params(), rules.ranked_by)
    nothing: list[str] = []
    if written.kept == 0 and scored > 0:
        nothing = [_nothing_kept(rules, scored)]
        log.warning("%s", nothing[-1])
    return SelectResult(written.url, scored, written.kept, params, nothing)


def _write_duplicates(folder: OutputFolder, dups: Duplicates | None) -> None:
    """OUT/duplicates.parquet from this selection's near-copies; none left from an earlier one."""
    if dups is None:
        if folder.exists(folder.duplicates):
            folder.remove(folder.duplicates)
        return
    with folder.writer(folder.duplicates) as f, pq.ParquetWriter(f, DUPLICATES_SCHEMA) as w:
        for table in dups.tables():
            w.write_table(table)


def _nothing_kept(rules: Rules, scored: int) -> str:
    """The warning for a selection that keeps nothing (`--keep 1e-9`, a --min-score above all)."""
    asked = (
        f"--keep {rules.keep:g}" if rules.keep is not None else f"--min-score {rules.min_score:g}"
    )
    return (f"the selection keeps 0 of {scored} scored samples ({asked}): emit will write "
            "empty shards; give a larger --keep or a lower --min-score")  # fmt: skip


def _lacks_signatures(table: pa.Table) -> bool:
    """Whether a candidate of the part has no signature (classmeans.signatures is then None)."""
    ok = ok_mask(table)
    if not ok.any() or SIGNATURE not in table.column_names:
        return bool(ok.any())
    column = table[SIGNATURE]
    return (
        column.null_count > 0 and not pc.is_valid(column).to_numpy(zero_copy_only=False)[ok].all()
    )


def _check_has_sage_scores(
    folder: OutputFolder, shards: list[str], read: Callable[[str], pa.Table]
) -> None:
    """The first part with an ok row tells whether the run has SAGE scores at all.

    Error rows never have a score, so a part of error rows only (a hostile shard) says nothing.
    """
    for name in shards:
        part = read(name)
        ok = ok_mask(part)
        if ok.any():  # only the score column filtered: the whole part was a copy of every column
            if part["score"].filter(pa.array(ok)).null_count == int(ok.sum()):
                raise InputError(
                    f"the scores under {folder.url} have no SAGE score: run `sage-stream sketch` "
                    "and `score`, or choose another --scorer"
                )
            return
