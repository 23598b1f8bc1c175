"""manifest.json and shardindex.json from per-shard counts; the commit ends with _SUCCESS."""

from __future__ import annotations

import pytest

from sage_stream.errors import StorageError
from sage_stream.outputs import manifest
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


def test_commit_writes_manifest_index_then_success_and_drops_work(mem_url):
    folder = OutputFolder(mem_url)
    folder.claim({"inputs": ["in/a.tar"]}, {"ell": 16}, overwrite=False)
    for shard in SHARDS:
        folder.write_bytes(folder.part(shard["name"]), b"part")
        if shard["emitted"]:
            folder.write_bytes(folder.shard(shard["name"]), b"shard")
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
    for shard in SHARDS:
        folder.write_bytes(folder.part(shard["name"]), b"part")
    folder.write_bytes(folder.shard("a.tar"), b"shard")  # b.parquet's output is missing
    with pytest.raises(StorageError, match=r"missing before _SUCCESS.*shards/b\.parquet"):
        manifest.commit(folder, SHARDS, {"keep": 0.5}, {}, None)
    assert not folder.is_complete() and not folder.exists(folder.manifest)
