"""manifest.json and shardindex.json from per-shard counts; the commit ends with _SUCCESS."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sage_stream.errors import OutputLockedError, StorageError
from sage_stream.outputs import lease, manifest
from sage_stream.outputs.folder import OutputFolder

SHARDS = [
    {"name": "a.tar", "url": "in/a.tar", "format": "tar", "emitted": True, "seen": 10,
     "scored": 9, "errored": 1, "kept": 4, "shard_error": None},
    {"name": "b.parquet", "url": "in/b.parquet", "format": "parquet", "emitted": True,
     "seen": 5, "scored": 5, "errored": 0, "kept": 2, "shard_error": None},
    {"name": "c.tar", "url": "in/c.tar", "format": "tar", "emitted": False, "seen": 3,
     "scored": 0, "errored": 3, "kept": 0, "shard_error": "truncated"},
]  # fmt: skip


def test_totals_add_up():
    assert manifest.totals(SHARDS) == {"seen": 18, "scored": 14, "errored": 4, "kept": 6,
                                       "dropped": 8}  # fmt: skip


def test_index_lists_emitted_tar_shards_relative_to_itself():
    index = manifest.shard_index(SHARDS)
    assert index["__kind__"] == "wids-shard-index-v1"
    assert index["shardlist"] == [{"url": "shards/a.tar", "nsamples": 4}]
    assert "not_listed" not in index  # an index of plain tar shards is as it was


def test_index_leaves_gzipped_shards_to_other_readers():
    gz = [{**SHARDS[0], "name": "a.tgz"}, {**SHARDS[0], "name": "b.tar.gz"}, *SHARDS]
    index = manifest.shard_index(gz)
    assert index["shardlist"] == [{"url": "shards/a.tar", "nsamples": 4}]
    assert [s["url"] for s in index["not_listed"]] == ["shards/a.tgz", "shards/b.tar.gz"]


def rows(n: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(n))}), buf)
    return buf.getvalue()


def tar_of(n: int) -> bytes:
    """An emitted tar of n samples: a payload and a `.sage.json` member each."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(n):
            for name in (f"k{i}.npy", f"k{i}.sage.json"):
                info = tarfile.TarInfo(name)
                info.size = 2
                tf.addfile(info, io.BytesIO(b"{}"))
    return buf.getvalue()


def write_outputs(folder: OutputFolder, shards=SHARDS) -> None:
    for shard in shards:
        folder.write_bytes(folder.part(shard["name"]), rows(shard["seen"]))
        if shard["emitted"]:
            data = tar_of(shard["kept"]) if shard["format"] == "tar" else rows(shard["kept"])
            folder.write_bytes(folder.shard(shard["name"]), data)


def test_commit_writes_manifest_index_then_success_and_drops_work(mem_url):
    folder = OutputFolder(mem_url)
    folder.claim({"inputs": ["in/a.tar"]}, {"ell": 16}, overwrite=False)
    write_outputs(folder)
    with lease.hold(folder):
        written = manifest.commit(folder, SHARDS, {"keep": 0.5}, {"ell": 16}, None)
    assert folder.is_complete() and not folder.exists(folder.work())
    on_disk = folder.read_json(folder.manifest)
    assert on_disk == written
    assert on_disk["identity"] == {"inputs": ["in/a.tar"]}  # read from _work/ before it went
    assert on_disk["outputs"] == [{"url": "shards/a.tar", "samples": 4},
                                  {"url": "shards/b.parquet", "samples": 2}]  # fmt: skip
    assert [s["name"] for s in on_disk["shard_errors"]] == ["c.tar"]
    assert folder.read_json(folder.index)["shardlist"][0]["nsamples"] == 4
    assert "timings" not in on_disk and "out" not in on_disk["config"]


def test_commit_refuses_when_a_listed_output_is_missing(mem_url):
    folder = OutputFolder(mem_url)
    write_outputs(folder)
    folder.remove(folder.shard("b.parquet"))
    with lease.hold(folder), pytest.raises(StorageError, match=r"shards/b\.parquet is missing"):
        manifest.commit(folder, SHARDS, {"keep": 0.5}, {}, None)
    assert not folder.is_complete() and not folder.exists(folder.manifest)


@pytest.mark.parametrize("name, data, said", [
    ("a.tar", tar_of(3), r"shards/a\.tar holds 3 samples, 4 listed"),
    ("b.parquet", rows(7), r"shards/b\.parquet holds 7 samples, 2 listed"),
    ("c.tar", b"x" * 10, r"part-c\.tar\.parquet cannot be read"),
])  # fmt: skip
def test_commit_refuses_an_output_whose_count_is_not_the_listed_one(mem_url, name, data, said):
    """Another writer's shard under the same name (issue 15: 143 listed, 285 held)."""
    folder = OutputFolder(mem_url)
    write_outputs(folder)
    url = folder.part(name) if name == "c.tar" else folder.shard(name)
    folder.write_bytes(url, data)
    with lease.hold(folder), pytest.raises(StorageError, match=said):
        manifest.commit(folder, SHARDS, {"keep": 0.5}, {}, None)
    assert not folder.is_complete()


def test_commit_refuses_without_the_lease(mem_url):
    folder = OutputFolder(mem_url)
    write_outputs(folder)
    with lease.hold(folder):
        folder.remove(lease.lease_url(folder))  # broken by --force-unlock elsewhere
        with pytest.raises(OutputLockedError, match="no longer holds _LEASE"):
            manifest.commit(folder, SHARDS, {"keep": 0.5}, {}, None)
    assert not folder.is_complete()
