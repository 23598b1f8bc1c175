"""Input expansion (every form and every error), URL helpers and atomic writes."""

from __future__ import annotations

import os

import fsspec
import pytest
from shardmaker import write_bytes

from sage_stream.errors import InputError
from sage_stream.inputs import expand_inputs
from sage_stream.sample import ShardRef
from sage_stream.storage import atomic_write, filesystem, join, write_bytes_atomic


def touch(*urls: str) -> None:
    for url in urls:
        write_bytes(url, b"x")


def names(refs: list[ShardRef]) -> list[str]:
    return [r.name for r in refs]


def test_single_local_path_is_an_absolute_plain_path(tmp_path, monkeypatch):
    touch(str(tmp_path / "a.tar"))
    monkeypatch.chdir(tmp_path)
    (ref,) = expand_inputs(["a.tar"])
    assert ref == ShardRef(url=str(tmp_path / "a.tar"), name="a.tar", format="tar")


def test_file_url_becomes_plain_path(tmp_path):
    touch(str(tmp_path / "a.parquet"))
    (ref,) = expand_inputs([f"file://{tmp_path}/a.parquet"])
    assert ref.url == str(tmp_path / "a.parquet")
    assert ref.format == "parquet"


def test_formats_from_extension(mem_url):
    touch(f"{mem_url}/a.tar", f"{mem_url}/b.parquet", f"{mem_url}/c.pq")
    refs = expand_inputs([f"{mem_url}/a.tar", f"{mem_url}/b.parquet", f"{mem_url}/c.pq"])
    assert [r.format for r in refs] == ["tar", "parquet", "parquet"]
    assert all(r.url.startswith("memory://") for r in refs)


def test_brace_range_and_alternatives(mem_url):
    touch(*(f"{mem_url}/shard-{i:03d}.tar" for i in range(3)), f"{mem_url}/x.tar")
    refs = expand_inputs([f"{mem_url}/shard-{{000..002}}.tar"])
    assert names(refs) == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    refs = expand_inputs([f"{mem_url}/{{x,shard-001}}.tar"])
    assert names(refs) == ["x.tar", "shard-001.tar"]


def test_large_brace_pattern_lists_the_folder_once(mem_url):
    touch(*(f"{mem_url}/s-{i:02d}.tar" for i in range(20)))
    assert len(expand_inputs([f"{mem_url}/s-{{00..19}}.tar"])) == 20
    with pytest.raises(InputError, match=r"s-20\.tar: does not exist"):
        expand_inputs([f"{mem_url}/s-{{00..20}}.tar"])


def test_an_existing_path_with_pattern_characters_is_that_path(tmp_path, mem_url):
    # issue 25, defect 7: `in pút [1]/` exists, so it is a folder, not a glob matching nothing
    folder = tmp_path / "in pút [1]"
    touch(str(folder / "b.tar"), str(folder / "a.tar"), str(tmp_path / "x{1,2}.tar"))
    touch(str(tmp_path / "in pút 1" / "decoy.tar"))  # what `[1]` would match as a glob
    assert names(expand_inputs([str(folder)])) == ["a.tar", "b.tar"]
    assert names(expand_inputs([str(folder / "a.tar")])) == ["a.tar"]
    assert names(expand_inputs([str(tmp_path / "x{1,2}.tar")])) == ["x{1,2}.tar"]
    touch(f"{mem_url}/s [0].tar")
    assert names(expand_inputs([f"{mem_url}/s [0].tar"])) == ["s [0].tar"]
    # a pattern that does not exist literally is still a pattern
    assert names(expand_inputs([str(tmp_path / "in pút [1]" / "*.tar")])) == ["decoy.tar"]


def test_glob_is_sorted_and_files_only(tmp_path):
    touch(*(str(tmp_path / n) for n in ["c.tar", "a.tar", "b.tar"]))
    os.mkdir(tmp_path / "d.tar")
    refs = expand_inputs([str(tmp_path / "*.tar")])
    assert names(refs) == ["a.tar", "b.tar", "c.tar"]


def test_folder_takes_shards_sorted_not_recursive(mem_url):
    touch(f"{mem_url}/b.parquet", f"{mem_url}/a.tar", f"{mem_url}/notes.txt")
    touch(f"{mem_url}/sub/z.tar")
    assert names(expand_inputs([mem_url])) == ["a.tar", "b.parquet"]


def test_list_file_with_comments_and_relative_entries(mem_url, tmp_path):
    touch(f"{mem_url}/data/a.tar", f"{mem_url}/data/b.tar", str(tmp_path / "c.tar"))
    listing = f"# shards\n\ndata/a.tar\n  {mem_url}/data/b.tar  \n{tmp_path}/c.tar\n"
    write_bytes(f"{mem_url}/list.txt", listing.encode())
    refs = expand_inputs([f"@{mem_url}/list.txt"])
    assert names(refs) == ["a.tar", "b.tar", "c.tar"]
    assert refs[2].url == str(tmp_path / "c.tar")


def test_local_list_file_relative_entries(tmp_path):
    touch(str(tmp_path / "shards" / "a.tar"))
    (tmp_path / "list.txt").write_text("shards/a.tar\n")
    (ref,) = expand_inputs([f"@{tmp_path}/list.txt"])
    assert ref.url == str(tmp_path / "shards" / "a.tar")


def test_inputs_keep_the_order_given(mem_url):
    touch(f"{mem_url}/b.tar", f"{mem_url}/a.tar", f"{mem_url}/c.tar")
    refs = expand_inputs([f"{mem_url}/c.tar", f"{mem_url}/{{b,a}}.tar"])
    assert names(refs) == ["c.tar", "b.tar", "a.tar"]


@pytest.mark.parametrize(
    ("make", "given", "message"),
    [
        ([], "nothing-*.tar", "pattern matches nothing"),
        ([], "missing.tar", "missing.tar: does not exist"),
        (["a.json"], "a.json", "unknown shard format '.json'"),
        (["a.json"], "*.json", "unknown shard format"),
        (["a.tar"], "{a,a}.tar", "given more than once"),
        (["notes.txt"], "", "folder has no .tar"),
        ([], "@missing.txt", "cannot read input list"),
    ],
)
def test_errors_name_the_input(mem_url, make, given, message):
    touch(*(f"{mem_url}/{n}" for n in make))
    given = f"@{mem_url}/{given[1:]}" if given.startswith("@") else f"{mem_url}/{given}"
    with pytest.raises(InputError, match=message):
        expand_inputs([given])


def test_same_name_in_two_folders_is_an_error(mem_url):
    touch(f"{mem_url}/x/a.tar", f"{mem_url}/y/a.tar")
    with pytest.raises(InputError, match="two input shards are named 'a.tar'"):
        expand_inputs([f"{mem_url}/x/a.tar", f"{mem_url}/y/a.tar"])


def test_same_url_spelled_twice_is_a_duplicate(mem_url):
    touch(f"{mem_url}/a.tar")
    with pytest.raises(InputError, match="given more than once"):
        expand_inputs([f"{mem_url}/a.tar", mem_url])


@pytest.mark.parametrize("text", ["", "# only a comment\n", "@other.txt\n"])
def test_bad_list_files(mem_url, text):
    write_bytes(f"{mem_url}/list.txt", text.encode())
    with pytest.raises(InputError, match="list"):
        expand_inputs([f"@{mem_url}/list.txt"])


def test_no_inputs():
    with pytest.raises(InputError, match="no inputs"):
        expand_inputs([])


def test_filesystem_and_join(tmp_path):
    fs, path = filesystem("memory://bucket/a.tar")
    assert "memory" in fs.protocol and path == "/bucket/a.tar"
    fs, path = filesystem(f"file://{tmp_path}/a.tar")
    assert path == f"{tmp_path}/a.tar"
    assert join("s3://b/out", "shards", "a.tar") == "s3://b/out/shards/a.tar"
    assert join("s3://b/out/", "/scores") == "s3://b/out/scores"
    assert join("memory://", "x") == "memory://x"
    assert join("out", "shards", "a.tar") == os.path.join("out", "shards", "a.tar")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_atomic_write_appears_only_on_success(where, tmp_path, mem_url):
    url = str(tmp_path / "sub" / "f.bin") if where == "local" else f"{mem_url}/f.bin"
    fs, path = filesystem(url)
    with atomic_write(url) as f:
        f.write(b"hello")
        assert not fs.exists(path)
    assert fs.cat(path) == b"hello"
    write_bytes_atomic(url, b"again")
    assert fs.cat(path) == b"again"
    assert fs.ls(fs._parent(path), detail=False) == [path]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_atomic_write_leaves_nothing_on_exception(where, tmp_path, mem_url):
    url = str(tmp_path / "f.bin") if where == "local" else f"{mem_url}/f.bin"
    fs, path = filesystem(url)
    with pytest.raises(RuntimeError), atomic_write(url) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert not fs.exists(path)
    parent = fs._parent(path)
    assert not fs.exists(parent) or fs.ls(parent, detail=False) == []


def test_atomic_write_keeps_old_content_on_exception(mem_url):
    url = f"{mem_url}/f.bin"
    write_bytes_atomic(url, b"old")
    with pytest.raises(ValueError), atomic_write(url) as f:
        f.write(b"new")
        raise ValueError
    assert fsspec.filesystem("memory").cat(url) == b"old"
