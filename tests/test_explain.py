"""Decisions recorded (issue 26.2): every scores row of a run says whether it was kept and why
not (OUT/decisions.parquet), `sage-stream inspect OUT --key KEY` shows one, and `inspect OUT`
the mix per class. Checked against a direct computation on the scores table."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from decided import expected
from tiny import blobs, train_checkpoint, write_parquet_set, write_tar_set

from sage_stream.cli import main
from sage_stream.errors import InputError, StorageError
from sage_stream.outputs import decisions_file
from sage_stream.select.reference import select

COMMON = ["--device", "cpu", "--no-progress", "--ell", "8", "--loader-workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    x, _, noisy = blobs(120, flip=0.05)  # few flips: a clean pool, decided by the filter
    return {"root": root, "tar": write_tar_set(root / "tar", x, noisy, shards=2),
            "parquet": write_parquet_set(root / "pq", x, noisy, shards=2),
            "ckpt": train_checkpoint(root / "p.pt", x, noisy)}  # fmt: skip


def run(data, kind: str, name: str, *options: str):
    out = data["root"] / name
    label = ["--label-key", "label"] if kind == "parquet" else []
    argv = ["run", *data[kind], "--model", "tiny:mlp", "--checkpoint", data["ckpt"],
            "--out", str(out), *label, *COMMON, *options]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def tar_out(data):
    return run(data, "tar", "tar-out", "--keep", "0.4")  # the default scorer, sage-coverage


def check_decisions(out, scorer: str, keep: float | None = None, min_score: float | None = None,
                    balance: str = "proportional"):  # fmt: skip
    """Each part against the scores part; every row as computed on the whole scores table."""
    scores = pq.read_table(out / "scores")
    kept = pq.read_table(out / "selection.parquet")
    chosen = select(scores, scorer=scorer, keep=keep, min_score=min_score, balance=balance)
    want = expected(scores, chosen, "sage" if min_score is not None else scorer, keep, min_score,
                    balance)  # fmt: skip
    got = []
    decided = pq.ParquetFile(out / "decisions.parquet")
    index = json.loads(decided.metadata.metadata[decisions_file.INDEX_KEY])
    for part in sorted((out / "scores").iterdir()):  # a row group per shard, in the part's order
        shard = part.name[len("part-") : -len(".parquet")]
        mine = decided.read_row_group(index[shard][0])
        assert mine["__key__"].to_pylist() == pq.read_table(part)["__key__"].to_pylist()
        got += mine.to_pylist()
    assert got == pq.read_table(out / "decisions.parquet").to_pylist()  # a plain Parquet file
    by_name = {(r["__shard__"], r["__key__"]): r for r in got}
    rows = zip(scores["__shard__"].to_pylist(), scores["__key__"].to_pylist(), want, strict=True)
    for shard, key, (why, value, cut) in rows:
        row = by_name[(shard, key)]
        assert (row["decision"], row["value"], row["cut"]) == (why, value, cut), (shard, key)
    assert {(r["__shard__"], r["__key__"]) for r in got if r["kept"]} == set(
        zip(kept["__shard__"].to_pylist(), kept["__key__"].to_pylist(), strict=True))  # fmt: skip
    summary = json.loads(decided.metadata.metadata[decisions_file.SUMMARY_KEY])
    assert summary["totals"] == {d: n for d, n in _count(got).items()}
    return got, summary


def _count(rows) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["decision"]] = counts.get(r["decision"], 0) + 1
    return counts


def _inspect(out, key, capsys) -> str:
    capsys.readouterr()
    assert main(["inspect", str(out), "--key", key]) == 0
    return capsys.readouterr().out


def test_a_tar_run_decides_every_row_as_computed_directly(tar_out, capsys):
    got, summary = check_decisions(tar_out, "sage-coverage", keep=0.4)
    # the blobs' flipped labels: nearer another class's mean (the class-mean rule)
    assert {"kept", "below_cut", "other_class"} <= {r["decision"] for r in got}
    manifest = json.loads((tar_out / "manifest.json").read_text())
    assert manifest["decisions"] == summary["totals"]
    assert main(["inspect", str(tar_out)]) == 0
    text = capsys.readouterr().out
    for c in summary["classes"]:
        assert f"class {c['label']}: {c['kept']} of {c['rows']} kept, cut " in text


@pytest.mark.parametrize("decision", ["kept", "below_cut", "other_class"])
def test_inspect_key_says_why(tar_out, capsys, decision):
    got, summary = check_decisions(tar_out, "sage-coverage", keep=0.4)
    row = next(r for r in got if r["decision"] == decision)
    text = _inspect(tar_out, row["__key__"], capsys)
    said = "KEPT: ranking value" if decision == "kept" else f"dropped ({decision})"
    assert said in text
    number = {"kept": row["value"], "below_cut": row["cut"], "other_class": row["class_margin"]}[
        decision
    ]
    assert f"{number:.6g}" in text
    if decision == "other_class":
        assert f"nearer the mean of class {row['nearer_class']:.0f}" in text
    c = next(c for c in summary["classes"] if c["label"] == row["label"])
    assert f"class {c['label']}: {c['kept']} of {c['rows']} kept, cut {c['cut']:.6g}" in text


def test_parquet_and_another_scorer(data, capsys):
    out = run(data, "parquet", "pq-out", "--keep", "0.3", "--scorer", "sage", "--balance", "none")
    got, _ = check_decisions(out, "sage", keep=0.3, balance="none")
    assert {r["decision"] for r in got} == {"kept", "below_cut"}
    row = next(r for r in got if r["decision"] == "below_cut")
    assert "dropped (below_cut): ranking value" in _inspect(out, row["__key__"], capsys)


def test_every_select_rewrites_the_decisions(data, tar_out, capsys):
    out = data["root"] / "reselect"
    shutil.copytree(tar_out, out)
    assert main(["select", "--out", str(out), "--min-score", "0.5"]) == 0
    got, summary = check_decisions(out, "sage-coverage", min_score=0.5)
    assert summary["selection"]["min_score"] == 0.5 and "agreement_cut" not in summary["classes"][0]
    assert {r["decision"] for r in got} == {"kept", "min_score"}
    row = next(r for r in got if r["decision"] == "min_score")
    assert "below --min-score 0.5" in _inspect(out, row["__key__"], capsys)
    assert main(["emit", *data["tar"], "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["decisions"] == summary["totals"]


def test_a_select_that_stops_part_way_leaves_no_decisions(data, tar_out, capsys, monkeypatch):
    out = data["root"] / "stopped"
    shutil.copytree(tar_out, out)
    calls = []

    def fail_second(sink, shard, table):
        calls.append(shard)
        if len(calls) == 2:
            raise InputError("stopped")
        write(sink, shard, table)

    write = decisions_file.DecisionSink.write
    monkeypatch.setattr(decisions_file.DecisionSink, "write", fail_second)
    assert main(["select", "--out", str(out), "--keep", "0.2"]) == 2
    assert not (out / "decisions.parquet").exists()
    key = pq.read_table(out / "scores")["__key__"][0].as_py()
    assert "recorded no decisions" in _inspect(out, key, capsys)
    monkeypatch.undo()
    assert main(["select", "--out", str(out), "--keep", "0.2"]) == 0
    check_decisions(out, "sage-coverage", keep=0.2)


def test_emit_refuses_to_commit_with_decisions_missing(data, tar_out):
    out = data["root"] / "holed"
    shutil.copytree(tar_out, out)
    assert main(["select", "--out", str(out), "--keep", "0.4"]) == 0
    whole = pq.ParquetFile(out / "decisions.parquet")
    index = json.loads(whole.metadata.metadata[decisions_file.INDEX_KEY])
    first = sorted(index)[0]
    meta = {**whole.metadata.metadata, decisions_file.INDEX_KEY: json.dumps({first: [0, 3]})}
    table = whole.read_row_group(0).slice(0, 3)  # of the first shard only 3 rows: a hole
    pq.write_table(table.replace_schema_metadata(meta), out / "decisions.parquet")
    from sage_stream import api

    with pytest.raises(StorageError, match=f"{first}: 3 of 60"):
        api.emit(data["tar"], out=str(out), progress=False)
    assert not (out / "_SUCCESS").exists()


def test_an_unknown_key_is_one_line(tar_out, capsys):
    assert main(["inspect", str(tar_out), "--key", "no-such-key"]) == 2
    assert "no sample with key 'no-such-key'" in capsys.readouterr().err
