"""Hostile and unlucky input (issue 15, "Trust at scale"): nothing is lost, nothing escapes.

1. A shard whose name looks like a temporary (`night.tmp-2024.tar`, even `a.tar.tmp-<hex>`)
   keeps its output shard and scores part: temporaries live in OUT/_work/tmp/ only, and that
   folder is what is cleared before _SUCCESS; no name is matched against a pattern.
2. Member names that would be paths outside the extraction folder (`../x`, `/abs/x`) make the
   sample an error row, and emitted members carry safe headers (no setuid/setgid, owner 0).
3. A member name that is not UTF-8 makes an error row with a writable key, not a traceback.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardmaker import npy_bytes, write_bytes
from tiny import DIM, blobs, key, train_checkpoint, write_tar_set

import sage_stream
from sage_stream.errors import SageError
from sage_stream.outputs.folder import OutputFolder

OPTIONS = dict(model="tiny:mlp", ell=8, batch_size=32, device="cpu", keep=0.5, progress=False)


def fields(i: int) -> dict[str, bytes]:
    x = np.random.default_rng(i).normal(size=DIM).astype(np.float32)
    return {"npy": npy_bytes(x), "cls": str(i % 3).encode()}


def hostile_tar(members: list[tuple[str, bytes, int]]) -> bytes:
    """A tar with exactly these (name, data, mode) members, names written as raw bytes."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
        errors="surrogateescape",
    ) as tf:  # fmt: skip
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            info.uid, info.gid, info.uname, info.gname = 1000, 1000, "mallory", "mallory"
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_members(k: str, i: int, mode: int = 0o644) -> list[tuple[str, bytes, int]]:
    return [(f"{k}.{f}", data, mode) for f, data in fields(i).items()]


def score_rows(out: Path) -> dict[str, dict]:
    rows = {}
    for part in sorted((out / "scores").glob("part-*.parquet")):
        for row in pq.read_table(part).to_pylist():
            rows[row["__key__"]] = row
    return rows


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    x, _, noisy = blobs(120)
    return train_checkpoint(root / "proxy.pt", x, noisy)


# --- 1. a shard named like a temporary ----------------------------------------------------


def test_shard_named_like_a_temporary_keeps_its_output(tmp_path, ckpt):
    x, _, noisy = blobs(120)
    urls = write_tar_set(tmp_path / "in", x, noisy)
    night = tmp_path / "in" / "night.tmp-2024.tar"
    os.rename(urls[1], night)
    out = tmp_path / "out"
    sage_stream.run(str(tmp_path / "in"), out=str(out), checkpoint=ckpt, **OPTIONS)
    assert (out / "_SUCCESS").exists()
    shard, part = (
        out / "shards" / "night.tmp-2024.tar",
        out / "scores" / "part-night.tmp-2024.tar.parquet",
    )
    assert shard.exists() and part.exists()
    assert pq.read_table(part).num_rows == 40
    with tarfile.open(shard) as tf:
        names = tf.getnames()
    assert names and all(n.split(".", 1)[0] in {key(i) for i in range(40, 80)} for n in names)


def test_check_outputs_names_what_is_missing(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"))
    shards = [
        {"name": "a.tar", "format": "tar", "emitted": True},
        {"name": "b.tar", "format": "tar", "emitted": False},
    ]
    folder.write_bytes(folder.part("a.tar"), b"x")
    folder.write_bytes(folder.part("b.tar"), b"x")
    folder.write_bytes(folder.shard("a.tar"), b"x")
    folder.check_outputs(shards)  # b.tar was not emitted: no shard needed
    folder.remove(folder.shard("a.tar"))
    with pytest.raises(SageError, match=r"shards/a\.tar"):
        folder.check_outputs(shards)
    folder.write_bytes(folder.shard("a.tar"), b"x")
    folder.remove(folder.part("b.tar"))
    with pytest.raises(SageError, match=r"part-b\.tar\.parquet"):
        folder.check_outputs(shards)


def test_remove_temporaries_takes_only_real_temporaries(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"))
    keep = [folder.shard("night.tmp-2024.tar"), folder.part("night.tmp-2024.tar"),
            folder.shard("x.tmp-0123456789ab.tar"), folder.shard("a.tar.tmp-0123456789ab"),
            folder.part("a.tar") + ".tmp-abcdef012345"]  # fmt: skip
    junk = [folder.work("tmp", "0123456789ab-a.tar")]
    for url in keep + junk:
        folder.write_bytes(url, b"x")
    folder.remove_temporaries()
    assert all(folder.exists(u) for u in keep)
    assert not any(folder.exists(u) for u in junk)


# --- 2. and 3. hostile member names and modes ---------------------------------------------


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, ckpt):
    root = tmp_path_factory.mktemp("hostile")
    members: list[tuple[str, bytes, int]] = []
    for i in range(24):  # normal samples, their members setuid/setgid/sticky and owned by 1000
        members += sample_members(f"h{i:03d}", i, mode=0o7755)
    members += sample_members("../evil", 100)
    members += sample_members("/abs/x", 101)
    members += sample_members("a/../../up", 102)
    members += sample_members("bad\udcffname", 103)  # raw 0xff in the header
    members += [("k900.np\udcffy", fields(104)["npy"], 0o644), ("k900.cls", b"1", 0o644)]
    for i in range(24, 36):
        members += sample_members(f"h{i:03d}", i)
    url = write_bytes(str(root / "in" / "hostile.tar"), hostile_tar(members))
    out = root / "out"
    result = sage_stream.run(url, out=str(out), checkpoint=ckpt, **OPTIONS)
    return out, result


def test_hostile_run_completes_with_error_rows(hostile_run):
    out, _ = hostile_run
    assert (out / "_SUCCESS").exists()
    rows = score_rows(out)
    assert len(rows) == 36 + 5
    for k in ("../evil", "/abs/x", "a/../../up"):
        assert rows[k]["status"] == "error", k
        assert "unsafe member name" in rows[k]["reason"], rows[k]
    bad = rows["bad\\xffname"]
    assert bad["status"] == "error" and "not valid UTF-8" in bad["reason"]
    assert rows["k900"]["status"] == "error" and "not valid UTF-8" in rows["k900"]["reason"]
    assert sum(r["status"] == "ok" for r in rows.values()) == 36


def test_hostile_run_resumes(hostile_run, tmp_path, ckpt):
    # a resume over the shard whose names are not UTF-8 (its key once crashed every rerun):
    # a copy of the finished OUT with its last steps undone, scored and emitted again
    import shutil

    out, _ = hostile_run
    again = tmp_path / "out"
    shutil.copytree(out, again)
    for name in ("_SUCCESS", "manifest.json", "shardindex.json", "selection.parquet"):
        (again / name).unlink(missing_ok=True)
    shutil.rmtree(again / "shards")
    shutil.rmtree(again / "scores")
    url = str(Path(str(out)).parent / "in" / "hostile.tar")
    sage_stream.run(url, out=str(again), checkpoint=ckpt, **OPTIONS)
    assert (again / "_SUCCESS").exists()
    assert score_rows(again) == score_rows(out)
    assert sorted(p.name for p in (again / "shards").iterdir()) == sorted(
        p.name for p in (out / "shards").iterdir()
    )


def test_emitted_shards_extract_safely(hostile_run, tmp_path):
    out, _ = hostile_run
    shards = sorted((out / "shards").glob("*.tar"))
    assert shards
    kept = 0
    for shard in shards:
        dest = tmp_path / "x" / "y" / shard.name
        dest.mkdir(parents=True)
        with tarfile.open(shard) as tf:
            members = tf.getmembers()
            tf.extractall(dest)  # Python's default filter on 3.11: no checks at all
        for m in members:
            assert m.isreg(), m.name
            assert m.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) == 0, (m.name, oct(m.mode))
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", ""), m.name
            assert not m.name.startswith("/") and ".." not in m.name.split("/"), m.name
        kept += sum(m.name.endswith(".sage.json") for m in members)
        for path in dest.rglob("*"):
            assert path.resolve().is_relative_to(dest.resolve())
            assert not path.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    assert kept > 0
    # nothing landed next to the extraction folder
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y"]
    assert not (tmp_path / "evil.npy").exists() and not Path("/abs/x.npy").exists()


# --- 8. gzipped tar shards are read and emitted, never ignored -----------------------------


def test_gzipped_tar_shards_in_a_folder_are_read_and_emitted_gzipped(tmp_path, ckpt):
    import gzip

    x, _, noisy = blobs(120)
    urls = write_tar_set(tmp_path / "in", x, noisy)
    for url, name in zip(urls[1:], ("b.tar.gz", "c.tgz"), strict=True):
        Path(tmp_path / "in" / name).write_bytes(gzip.compress(Path(url).read_bytes(), mtime=0))
        os.remove(url)
    out = tmp_path / "out"
    sage_stream.run(str(tmp_path / "in"), out=str(out), checkpoint=ckpt, **OPTIONS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["inputs"]] == ["b.tar.gz", "c.tgz", "part-000.tar"]
    assert manifest["totals"]["seen"] == 120
    for name in ("b.tar.gz", "c.tgz"):
        shard = out / "shards" / name
        assert shard.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as its name says
        with tarfile.open(shard) as tf:  # what any consumer does
            kept = [m.name for m in tf if m.name.endswith(".sage.json")]
        entry = [s for s in manifest["inputs"] if s["name"] == name][0]
        assert len(kept) == entry["kept"] > 0
    again = tmp_path / "again"
    sage_stream.run(str(tmp_path / "in"), out=str(again), checkpoint=ckpt, **OPTIONS)
    assert (again / "shards" / "c.tgz").read_bytes() == (out / "shards" / "c.tgz").read_bytes()


# --- 7. one finite outlier is an error row, never a run-wide abort -------------------------


@pytest.mark.parametrize("scale", [1e16, 1e19, 1e30])
def test_an_outlier_input_is_an_error_row_naming_it_and_select_runs(tmp_path, ckpt, scale):
    members: list[tuple[str, bytes, int]] = []
    for i in range(30):
        members += sample_members(f"o{i:03d}", i)
    wild = np.full(DIM, scale, dtype=np.float32)
    members += [("o999.npy", npy_bytes(wild), 0o644), ("o999.cls", b"1", 0o644)]
    url = write_bytes(str(tmp_path / "in" / "outlier.tar"), hostile_tar(members))
    out = tmp_path / "out"
    sage_stream.run(url, out=str(out), checkpoint=ckpt, **OPTIONS)
    rows = score_rows(out)
    assert rows["o999"]["status"] == "error", rows["o999"]
    assert rows["o999"]["reason"] in ("non-finite loss", "non-finite gradient",
                                      "gradient norm over 1e+15 (an outlier input?)")  # fmt: skip
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 30 and all(np.isfinite(r["score"]) for r in ok)
    assert (out / "_SUCCESS").exists()
    with pytest.raises(SageError, match=r"outlier\.tar.*key 'o999'"):
        sage_stream.run(url, out=str(tmp_path / "fail"), checkpoint=ckpt, on_error="fail",
                        **OPTIONS)  # fmt: skip
