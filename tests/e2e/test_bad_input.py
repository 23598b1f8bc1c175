"""Bad input, case by case (README, "Behaviour you can rely on"): every case finishes under
``--on-error skip`` with each skipped sample in scores/ and each shard failure in the manifest, counts adding up; and
stops under ``--on-error fail`` with one line naming the URL or shard and the key, exit 2, no
traceback. Shards are untrusted: no pickle, no member name used as a path, no member read
past the size limit, checkpoints loaded with weights_only=True.

Local files for speed; the object-storage cases (403, 404) use the moto server of conftest.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from paths import HELPERS
from shardmaker import npy_bytes, tar_bytes, write_bytes
from tiny import DIM, blobs, mlp, write_parquet_set

import sage_stream
from sage_stream.cli import main
from sage_stream.scores import NONFINITE_LOSS

TESTS = HELPERS  # the cwd of CLI subprocesses: `tiny:mlp` imports there
MAX_MEMBER = 4096
STEP = ["--model", "tiny:mlp", "--ell", "8", "--device", "cpu", "--no-progress"]
STEP += ["--max-member-bytes", str(MAX_MEMBER)]
FLAGS = [*STEP, "--keep", "0.5"]  # for `run`
OPTIONS = dict(
    model="tiny:mlp", keep=0.5, ell=8, device="cpu", progress=False, max_member_bytes=MAX_MEMBER
)


def sample(i: int, **fields: bytes | None) -> dict[str, bytes]:
    """A good sample (DIM floats + label i % 3) with some fields replaced or removed (None)."""
    x = np.random.default_rng(i).normal(size=DIM).astype(np.float32)
    good = {"npy": npy_bytes(x), "cls": str(i % 3).encode()}
    return {k: v for k, v in {**good, **fields}.items() if v is not None}


def raw_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def truncated() -> bytes:
    data = tar_bytes({f"t{i:03d}": sample(i) for i in range(10)})
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        cut = next(m.offset_data for m in tf.getmembers() if m.name == "t006.npy") + 10
    return data[:cut]  # t000..t005 complete, then the stream ends inside t006.npy


def pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


SHARDS = {
    "good.tar": lambda: tar_bytes({f"g{i:03d}": sample(i) for i in range(30)}),
    "truncated.tar": truncated,
    "undecodable.tar": lambda: tar_bytes(
        {"u000": sample(0), "u001": sample(1, npy=b"\x93NUMPY garbage"), "u002": sample(2)}
    ),
    "nolabel.tar": lambda: tar_bytes(
        {"n000": sample(0, cls=None), "n001": sample(1, npy=None), "n002": sample(2)}
    ),
    "nonfinite.tar": lambda: tar_bytes(
        {"f000": sample(0, npy=npy_bytes(np.full(DIM, np.inf, np.float32))), "f001": sample(1)}
    ),
    "empty.tar": lambda: tar_bytes({}),
    "zero.tar": lambda: b"",
    "dupes.tar": lambda: raw_tar(
        [
            (f"{k}.{f}", v)
            for k, i in [("d0", 0), ("d1", 1), ("d0", 2)]
            for f, v in sample(i).items()
        ]
    ),
    "big.tar": lambda: tar_bytes(
        {"b000": sample(0), "b001": sample(1, npy=b"x" * (MAX_MEMBER + 1)), "b002": sample(2)}
    ),
    "pickle.tar": lambda: tar_bytes({"p000": sample(0, npy=pickled_npy()), "p001": sample(1)}),
    "names.tar": lambda: tar_bytes(
        {"../../escape": sample(0), "/abs/evil": sample(1), "ok": sample(2)}
    ),
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad") / "in"
    for name, make in SHARDS.items():
        write_bytes(folder / name, make())
    return folder


@pytest.fixture(scope="module")
def skipped(bad) -> Path:
    """One run over every bad shard at once, under --on-error skip (the default)."""
    out = bad.parent / "out"
    sage_stream.run(str(bad), out=str(out), **OPTIONS)
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def score_rows(out: Path, shard: str) -> list[dict]:
    return pq.read_table(out / "scores" / f"part-{shard}.parquet").to_pylist()


# --- --on-error skip ---------------------------------------------------------------------


def test_skip_finishes_and_every_count_adds_up(skipped):
    m = manifest(skipped)
    t = m["totals"]
    assert (skipped / "_SUCCESS").exists() and m["config"]["on_error"] == "skip"
    assert t["seen"] == t["scored"] + t["errored"] and t["kept"] + t["dropped"] == t["scored"]
    assert sorted(s["name"] for s in m["inputs"]) == sorted(SHARDS)
    for shard in m["inputs"]:
        rows = score_rows(skipped, shard["name"])
        errored = sum(r["status"] == "error" for r in rows)
        assert shard["seen"] == len(rows) == shard["scored"] + errored, shard["name"]
        assert all(r["reason"] for r in rows if r["status"] == "error")
    assert t["seen"] == sum(s["seen"] for s in m["inputs"])


@pytest.mark.parametrize(
    ("shard", "key", "reason"),
    [
        ("undecodable.tar", "u001", "cannot decode 'npy'"),
        ("nolabel.tar", "n000", "missing label field 'cls'"),
        ("nolabel.tar", "n001", "no input member"),
        ("nonfinite.tar", "f000", NONFINITE_LOSS),
        ("pickle.tar", "p000", "cannot decode 'npy'"),  # allow_pickle=False: never unpickled
    ],
)
def test_skip_records_each_bad_sample_with_its_reason(skipped, shard, key, reason):
    rows = {r["__key__"]: r for r in score_rows(skipped, shard)}
    assert rows[key]["status"] == "error" and reason in rows[key]["reason"]
    assert rows[key]["score"] is None


def test_skip_records_the_second_of_two_duplicate_keys(skipped):
    rows = score_rows(skipped, "dupes.tar")
    assert [(r["__key__"], r["status"], r["reason"]) for r in rows] == [
        ("d0", "ok", None),
        ("d1", "ok", None),
        ("d0", "error", "duplicate key in shard"),
    ]


@pytest.mark.parametrize(
    ("shard", "reason"),
    [
        ("truncated.tar", "truncated or corrupt tar"),
        ("zero.tar", "truncated or corrupt tar: empty file"),
    ],
)
def test_skip_records_shard_failures_in_the_manifest(skipped, bad, shard, reason):
    m = manifest(skipped)
    (entry,) = [e for e in m["shard_errors"] if e["name"] == shard]
    assert entry["url"] == str(bad / shard) and reason in entry["shard_error"]
    ok = {r["__key__"] for r in score_rows(skipped, shard) if r["status"] == "ok"}
    with tarfile.open(skipped / "shards" / shard) as tf:  # whole, though its input was not
        keys = {m.name.split(".", 1)[0] for m in tf.getmembers()}
    assert keys <= ok and len(keys) == entry["kept"]


def test_samples_before_a_break_are_still_scored(skipped):
    rows = score_rows(skipped, "truncated.tar")
    assert [(r["__key__"], r["status"]) for r in rows] == [(f"t{i:03d}", "ok") for i in range(6)]


def test_a_member_over_the_limit_is_a_sample_error_and_the_shard_goes_on(skipped):
    rows = score_rows(skipped, "big.tar")
    assert [(r["__key__"], r["status"]) for r in rows] == [
        ("b000", "ok"), ("b001", "error"), ("b002", "ok")]  # fmt: skip
    assert (
        f"'b001.npy' is {MAX_MEMBER + 1} bytes, over the limit of {MAX_MEMBER}" in rows[1]["reason"]
    )
    assert "big.tar" not in [e["name"] for e in manifest(skipped)["shard_errors"]]


def test_an_unreadable_parquet_shard_is_recorded_under_skip(tmp_path):
    x, _, y = blobs(30)
    write_parquet_set(tmp_path / "in", x, y, shards=2)
    write_bytes(tmp_path / "in" / "corrupt.parquet", b"PAR1 but not Parquet")
    out = tmp_path / "out"
    options = {**OPTIONS, "input_key": "features", "label_key": "label"}
    sage_stream.run(str(tmp_path / "in"), out=str(out), **options)
    (entry,) = manifest(out)["shard_errors"]
    assert (
        entry["name"] == "corrupt.parquet" and "not a readable Parquet file" in entry["shard_error"]
    )
    assert not (out / "shards" / "corrupt.parquet").exists()
    assert "shards/corrupt.parquet" not in [o["url"] for o in manifest(out)["outputs"]]


def test_a_corrupt_parquet_row_group_costs_only_its_rows(tmp_path):
    x, _, y = blobs(80)
    (url, _) = write_parquet_set(tmp_path / "in", x, y, shards=2)  # 40 rows: groups 16, 16, 8
    data = bytearray(Path(url).read_bytes())
    chunk = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(1).column(1)  # features
    start = min(o for o in (chunk.data_page_offset, chunk.dictionary_page_offset) if o)
    data[start : start + 16] = b"\xff" * 16
    Path(url).write_bytes(bytes(data))
    out = tmp_path / "out"
    options = {**OPTIONS, "input_key": "features", "label_key": "label"}
    sage_stream.run(str(tmp_path / "in"), out=str(out), **options)
    assert manifest(out)["shard_errors"] == []
    rows = score_rows(out, "part-000.parquet")
    bad = [r for r in rows if r["status"] == "error"]
    assert len(rows) == 40 and [r["__key__"] for r in bad] == [f"k{i:05d}" for i in range(16, 32)]
    assert all("unreadable Parquet data in row group 1" in r["reason"] for r in bad)
    emitted = pq.read_table(out / "shards" / "part-000.parquet")["__key__"].to_pylist()
    assert emitted and not {f"k{i:05d}" for i in range(16, 32)} & set(emitted)
    assert {f"k{i:05d}" for i in range(32, 40)} & set(emitted)  # the group after it goes on


def test_an_empty_shard_is_not_an_error(skipped):
    (entry,) = [e for e in manifest(skipped)["inputs"] if e["name"] == "empty.tar"]
    assert (entry["seen"], entry["shard_error"]) == (0, None)
    with tarfile.open(skipped / "shards" / "empty.tar") as tf:
        assert tf.getmembers() == []


def test_member_names_are_keys_never_paths(skipped, bad):
    rows = {r["__key__"]: r["status"] for r in score_rows(skipped, "names.tar")}
    # names that would escape an extraction are recorded errors, never kept (issue 15)
    assert rows == {"../../escape": "error", "/abs/evil": "error", "ok": "ok"}
    root = bad.parent
    assert {p.relative_to(root).parts[0] for p in root.rglob("*")} == {"in", "out"}
    assert list(root.parent.rglob("escape*")) == []  # nothing written above the run's folders
    assert not Path("/abs/evil.npy").exists()


# --- --on-error fail ---------------------------------------------------------------------


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("sage-stream:")]
    return code, "\n".join(lines)


@pytest.mark.parametrize(
    ("shard", "expected"),
    [
        ("truncated.tar", ["{url} (after key 't005')", "truncated or corrupt tar"]),
        ("undecodable.tar", ["{url} (shard 'undecodable.tar'), key 'u001'", "cannot decode 'npy'"]),
        ("nolabel.tar", ["{url} (shard 'nolabel.tar'), key 'n000'", "missing label field 'cls'"]),
        ("nonfinite.tar", ["{url} (shard 'nonfinite.tar'), key 'f000'", "non-finite loss"]),
        ("dupes.tar", ["{url} (shard 'dupes.tar'), key 'd0'", "duplicate key in shard"]),
        ("zero.tar", ["{url}:", "empty file"]),
        ("big.tar", ["{url} (shard 'big.tar'), key 'b001'", "over the limit of 4096"]),
        ("pickle.tar", ["{url} (shard 'pickle.tar'), key 'p000'", "cannot decode 'npy'"]),
        ("missing.tar", ["{url}: does not exist"]),
    ],
)
def test_fail_stops_with_one_line_naming_the_shard_and_key(bad, tmp_path, capsys, shard, expected):
    url, out = str(bad / shard), tmp_path / "out"
    args = ["run", str(bad / "good.tar"), url, "--out", str(out), "--on-error", "fail", *FLAGS]
    code, line = run_cli(args, capsys)
    assert code == 2 and line.startswith("sage-stream: error: ") and "\n" not in line
    for part in expected:
        assert part.format(url=url) in line
    assert not (out / "_SUCCESS").exists()


def test_fail_accepts_an_empty_shard(bad, tmp_path, capsys):
    args = ["run", str(bad / "good.tar"), str(bad / "empty.tar"), "--out", str(tmp_path / "o")]
    code, line = run_cli([*args, "--on-error", "fail", *FLAGS], capsys)
    assert (code, line) == (0, "")


def test_sketch_from_another_model_is_refused_in_one_line(bad, tmp_path, capsys):
    other = mlp()
    with torch.no_grad():
        other[0].weight.add_(0.5)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    out, good = str(tmp_path / "out"), str(bad / "good.tar")
    assert run_cli(["sketch", good, "--out", out, *STEP], capsys)[0] == 0
    args = ["score", good, "--out", out, "--checkpoint", str(tmp_path / "other.pt"), *STEP]
    code, line = run_cli(args, capsys)
    assert code == 2 and line.startswith(f"sage-stream: error: {out}")
    assert "another" in line and "model" in line  # the run's record or the sketch refuses it


def test_a_checkpoint_that_would_run_code_is_refused(bad, tmp_path, capsys):
    target = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):  # noqa: ANN204 - what an attacker puts in a "checkpoint"
            return (Path.touch, (target,))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Boom()}))
    args = ["run", str(bad / "good.tar"), "--out", str(tmp_path / "out")]
    code, line = run_cli([*args, "--checkpoint", str(tmp_path / "evil.pt"), *FLAGS], capsys)
    assert code == 2 and "cannot be loaded safely" in line and str(tmp_path / "evil.pt") in line
    assert not target.exists()


@pytest.mark.slow
def test_the_process_exits_2_with_no_traceback(bad, tmp_path):
    url = str(bad / "truncated.tar")
    cmd = [sys.executable, "-m", "sage_stream", "run", url, "--out", str(tmp_path / "o")]
    done = subprocess.run(
        [*cmd, "--on-error", "fail", *FLAGS], cwd=TESTS, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sage-stream: error: {url} (after key 't005'): truncated")


# --- object storage: 403 and 404 ---------------------------------------------------------


@pytest.fixture
def on_s3(s3_bucket, s3_deny_get, bad):
    """good.tar and undecodable.tar, and denied.tar that a bucket policy makes unreadable."""
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem()
    for name in ("good.tar", "undecodable.tar"):
        fs.pipe(f"{s3_bucket}/in/{name}", (bad / name).read_bytes())
    fs.pipe(f"{s3_bucket}/in/denied.tar", tar_bytes({f"x{i}": sample(i) for i in range(5)}))
    s3_deny_get(s3_bucket, "in/denied.tar")
    return s3_bucket


@pytest.mark.s3
def test_unreadable_object_is_a_recorded_shard_failure_under_skip(on_s3):
    out = f"{on_s3}/out"
    result = sage_stream.run(f"{on_s3}/in", out=out, **OPTIONS)
    t = result.emit.totals
    assert t["seen"] == 33 == t["scored"] + t["errored"] and t["errored"] == 1
    m = json.loads(pytest.importorskip("s3fs").S3FileSystem().cat(f"{out}/manifest.json"))
    (entry,) = m["shard_errors"]
    assert entry["name"] == "denied.tar" and "access denied (403)" in entry["shard_error"]


@pytest.mark.s3
def test_unreadable_object_stops_a_failing_run_in_one_line(on_s3, capsys):
    url = f"{on_s3}/in/denied.tar"
    args = ["run", f"{on_s3}/in", "--out", f"{on_s3}/out", "--on-error", "fail", *FLAGS]
    code, line = run_cli(args, capsys)
    assert code == 2 and line.startswith(f"sage-stream: error: {url}: ")
    assert "access denied (403)" in line


@pytest.mark.s3
def test_missing_object_and_forbidden_bucket_are_one_line_errors(on_s3, s3_proxy, capsys):
    missing = f"{on_s3}/in/nope.tar"
    args = ["--out", f"{on_s3}/out", *FLAGS]
    code, line = run_cli(["run", missing, *args], capsys)
    assert (code, line) == (2, f"sage-stream: error: {missing}: does not exist")
    s3_proxy.plan = lambda method, path: "forbidden"  # S3 answers 403 to everything
    proxied = [*args, "--storage-option", f"endpoint_url={s3_proxy.endpoint}"]
    code, line = run_cli(["run", f"{on_s3}/in", *proxied], capsys)
    assert code == 2 and line.startswith(f"sage-stream: error: {on_s3}/in")
    assert "access denied" in line
