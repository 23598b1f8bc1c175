"""scores/ parts and selection.parquet: schema, shard errors, selection parameters, records."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from sage_stream.errors import InputError
from sage_stream.outputs.folder import OutputFolder
from sage_stream.outputs.tables import (
    SCORE_SCHEMA,
    annotations,
    errored_count,
    kept_by_shard,
    read_part,
    read_scores,
    read_selection,
    write_part,
    write_selection,
)


def part(shard: str, keys: list[str], status: list[str]) -> pa.Table:
    n = len(keys)
    return pa.table({
        "__key__": keys, "__shard__": [shard] * n, "label": list(range(n)),
        "score": [0.5 if s == "ok" else None for s in status], "loss": [1.0] * n,
        "grad_norm": [2.0] * n, "energy": [math.nan] * n, "coverage": [0.1] * n, "status": status,
        "reason": [None if s == "ok" else "bad" for s in status],
        "digest": [i - 2**62 if s == "ok" else None for i, s in enumerate(status)],
    })  # fmt: skip


def test_part_round_trip_with_its_shard_error(mem_url):
    folder = OutputFolder(mem_url)
    write_part(folder, "a.tar", part("a.tar", ["k1", "k2"], ["ok", "error"]), "stream broke")
    write_part(folder, "b.tar", part("b.tar", ["k3"], ["ok"]), None)
    table, error = read_part(folder, "a.tar")
    assert table.schema == SCORE_SCHEMA and error == "stream broke"
    assert read_part(folder, "b.tar")[1] is None
    assert errored_count(table) == 1 and errored_count(table.slice(0, 0)) == 0
    both = read_scores(folder, ["b.tar", "a.tar"], ["__key__"])
    assert both["__key__"].to_pylist() == ["k3", "k1", "k2"]  # in the order asked
    assert read_scores(folder, [], ["__key__"]).num_rows == 0


def test_missing_part_or_selection_says_which_step_to_run(mem_url):
    folder = OutputFolder(mem_url)
    with pytest.raises(InputError, match="run `sage-stream score` first"):
        read_part(folder, "a.tar")
    with pytest.raises(InputError, match="run `sage-stream select` first"):
        read_selection(folder)


@pytest.mark.parametrize("spelling", ["plain", "file://", "~"])
def test_part_in_a_local_folder_however_spelled(tmp_path, monkeypatch, spelling):
    """Local parts are opened by pyarrow itself, fsspec's spellings of a path included."""
    monkeypatch.setenv("HOME", str(tmp_path))
    url = {"plain": str(tmp_path / "out"), "file://": f"file://{tmp_path}/out", "~": "~/out"}
    write_part(OutputFolder(str(tmp_path / "out")), "a.tar", part("a.tar", ["k"], ["ok"]), "x")
    table, error = read_part(OutputFolder(url[spelling]), "a.tar", ["__key__", "status"])
    assert table.to_pylist() == [{"__key__": "k", "status": "ok"}] and error == "x"


def test_a_local_part_is_read_again_after_a_transient_error(tmp_path, monkeypatch):
    """A FUSE mount's ETIMEDOUT/EAGAIN is retried, as it was through the fsspec reader."""
    monkeypatch.setenv("SAGE_STREAM_RETRY_DELAY", "0")
    folder = OutputFolder(str(tmp_path))
    write_part(folder, "a.tar", part("a.tar", ["k"], ["ok"]), None)
    real, calls = pa.OSFile, []

    def flaky(*args: object) -> pa.OSFile:
        calls.append(args)
        if len(calls) == 1:
            raise TimeoutError("mount timed out")
        return real(*args)

    monkeypatch.setattr(pa, "OSFile", flaky)
    assert read_part(folder, "a.tar", ["__key__"])[0].to_pylist() == [{"__key__": "k"}]
    assert len(calls) == 2


def test_missing_part_in_a_local_folder_says_which_step_to_run(tmp_path):
    with pytest.raises(InputError, match="no scores for shard 'a.tar'.*sage-stream score"):
        read_part(OutputFolder(str(tmp_path)), "a.tar")


def test_selection_keeps_its_parameters(mem_url):
    folder = OutputFolder(mem_url)
    chosen = pa.table({"__key__": ["k1", "k3"], "__shard__": ["a.tar", "b.tar"], "label": [0, 1],
                       "score": [0.5, 0.25]})  # fmt: skip
    url = write_selection(folder, chosen, {"keep": 0.5, "scorer": "sage"})
    assert url == folder.selection
    table, params = read_selection(folder)
    assert params == {"keep": 0.5, "scorer": "sage"} and table.schema.metadata is None
    assert kept_by_shard(table) == {"a.tar": {"k1"}, "b.tar": {"k3"}}


def test_annotations_only_for_kept_ok_rows_with_finite_values():
    table = part("a.tar", ["k1", "k2", "k3"], ["ok", "error", "ok"])
    records = annotations(table, {"k1", "k2"}, "sage")
    assert list(records) == ["k1"]  # k2 is an error row, k3 not kept
    assert records["k1"] == {"label": 0, "score": 0.5, "loss": 1.0, "grad_norm": 2.0,
                             "energy": None, "scorer": "sage"}  # fmt: skip
