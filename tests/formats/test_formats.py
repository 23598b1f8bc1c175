"""Shard readers and copiers: tar and Parquet, good and broken input."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from shardmaker import (
    digit_samples,
    make_parquet_shard,
    make_tar_shard,
    tar_bytes,
    write_bytes,
)

from sage_stream.errors import InputError, ShardError
from sage_stream.formats import copy_selected, read_shard, sage_json
from sage_stream.formats.parquet import copy_selected_parquet, read_parquet
from sage_stream.formats.tar import (
    TarShardWriter,
    copy_selected_tar,
    read_tar,
    split_member_name,
)
from sage_stream.sample import ShardRef


def tar_ref(url: str) -> ShardRef:
    return ShardRef(url=url, name=url.rsplit("/", 1)[-1], format="tar")


def pq_ref(url: str) -> ShardRef:
    return ShardRef(url=url, name=url.rsplit("/", 1)[-1], format="parquet")


def raw_tar(members: list[tuple[str, bytes]], mtime: int = 0) -> bytes:
    """A tar with exactly these member names (TarShardWriter validates names; this does not)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> (header offset, data offset)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}


# --- tar: reading ------------------------------------------------------------------------


def test_tar_round_trip(mem_url):
    samples = digit_samples(5)
    url = make_tar_shard(f"{mem_url}/a.tar", samples)
    got = list(read_tar(tar_ref(url)))
    assert [s.key for s in got] == list(samples)
    assert [s.index for s in got] == list(range(5))
    assert all(s.shard == "a.tar" and s.error is None for s in got)
    assert [s.fields for s in got] == list(samples.values())


def test_writer_is_deterministic_and_keeps_field_order():
    samples = {"k": {"txt": b"1", "npy": b"abc", "seg.png": b"z"}}
    assert tar_bytes(samples) == tar_bytes(samples)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(samples))) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["k.txt", "k.npy", "k.seg.png"]
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {
        (0, 0o644, 0, 0, "", "")
    }


def test_writer_refuses_keys_that_would_not_read_back():
    with pytest.raises(InputError, match="would not read back"):
        TarShardWriter(io.BytesIO()).write("a.b", {"png": b""})


def test_webdataset_reads_our_shard(tmp_path):
    samples = digit_samples(3)
    url = make_tar_shard(tmp_path / "a.tar", samples)
    dataset = webdataset.WebDataset(url, shardshuffle=False, empty_check=False)
    got = {s["__key__"]: {k: s[k] for k in ("npy", "cls")} for s in dataset}
    assert got == samples


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/b.seg.png", ("a/b", "seg.png")),
        ("a.b/c.png", ("a.b/c", "png")),
        ("x.PNG", ("x", "png")),
        ("noext", None),
        ("._x.png", None),
        ("dir/._x.png", None),
        ("__index__", None),
        ("__meta__/x.json", None),
    ],
)
def test_split_member_name(name, expected):
    assert split_member_name(name) == expected


def test_grouping_skips_metadata_and_counts_keys_of_links_only(mem_url):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        link = tarfile.TarInfo("dir/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        for name, data in [("dir/a.seg.png", b"1"), ("dir/a.cls", b"2"), ("._junk.png", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in [("dir/b.npy", tarfile.DIRTYPE), ("dir/b.hard", tarfile.LNKTYPE)]:
            other = tarfile.TarInfo(name)
            other.type, other.linkname = kind, "dir/a.cls"
            tf.addfile(other)
    url = write_bytes(f"{mem_url}/a.tar", buf.getvalue())
    link, sample, folder = read_tar(tar_ref(url))
    assert (sample.key, sample.fields) == ("dir/a", {"seg.png": b"1", "cls": b"2"})
    # a key made only of a symlink or a folder is counted, as an error (issue 25, defect 8)
    assert (link.key, link.fields) == ("dir/link", {})
    assert link.error == "no regular file among its members (only a symlink)"
    assert (folder.key, folder.error) == (
        "dir/b",
        "no regular file among its members (only a directory, a hard link)",
    )


def test_empty_tar_yields_nothing(mem_url):
    url = write_bytes(f"{mem_url}/a.tar", tar_bytes({}))
    assert list(read_tar(tar_ref(url))) == []


def test_zero_byte_file_is_an_error(mem_url):
    url = write_bytes(f"{mem_url}/a.tar", b"")
    with pytest.raises(ShardError, match="a.tar"):
        list(read_tar(tar_ref(url)))


def test_missing_shard_is_a_shard_error(mem_url):
    with pytest.raises(ShardError, match="cannot open"):
        list(read_tar(tar_ref(f"{mem_url}/missing.tar")))


def test_duplicate_key_is_flagged_not_raised(mem_url):
    url = write_bytes(
        f"{mem_url}/a.tar", raw_tar([("a.cls", b"1"), ("b.cls", b"2"), ("a.cls", b"3")])
    )
    got = list(read_tar(tar_ref(url)))
    assert [(s.key, s.index, s.error) for s in got] == [
        ("a", 0, None),
        ("b", 1, None),
        ("a", 2, "duplicate key in shard"),
    ]


def test_repeated_field_is_flagged(mem_url):
    url = write_bytes(f"{mem_url}/a.tar", raw_tar([("a.png", b"1"), ("a.png", b"2")]))
    (sample,) = read_tar(tar_ref(url))
    assert sample.error == "repeated field png"
    assert sample.fields == {"png": b"1"}


def test_member_over_limit_is_a_sample_error_and_the_shard_goes_on(mem_url):
    data = raw_tar([("a.cls", b"1"), ("b.npy", b"x" * 1000), ("b.cls", b"2"), ("c.cls", b"3")])
    url = write_bytes(f"{mem_url}/a.tar", data)
    a, b, c = read_tar(tar_ref(url), max_member_bytes=100)
    assert (a.key, a.error, c.key, c.error, c.fields) == ("a", None, "c", None, {"cls": b"3"})
    assert b.key == "b" and "'b.npy' is 1000 bytes, over the limit of 100" in b.error
    assert b.fields["npy"] == b""  # never read


def test_sample_over_its_byte_budget_is_an_error_unread(mem_url):
    data = raw_tar([("a.x", b"1" * 60), ("a.y", b"2" * 60), ("b.cls", b"3")])
    url = write_bytes(f"{mem_url}/a.tar", data)
    a, b = read_tar(tar_ref(url), max_sample_bytes=100)
    assert "members add up to more than 100 bytes at 'a.y'" in a.error
    assert a.fields == {"x": b"1" * 60, "y": b""} and b.error is None


def test_a_sparse_member_is_a_sample_error_never_expanded(mem_url):
    """A GNU sparse member: a few bytes in the shard, its declared size when extracted."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("a.npy")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
        tf.addfile(tarfile.TarInfo("b.cls"), io.BytesIO(b""))
    data = bytearray(buf.getvalue())
    data[156:157] = b"S"  # typeflag GNUTYPE_SPARSE: no sparse map, realsize from the header
    hdr = data[:512]
    hdr[148:156] = b" " * 8
    data[148:156] = f"{sum(hdr):06o}\0 ".encode()
    url = write_bytes(f"{mem_url}/s.tar", bytes(data))
    a, b = read_tar(tar_ref(url))
    assert "sparse file" in a.error and b.key == "b"


def test_truncated_in_a_member_yields_complete_samples_then_raises(mem_url):
    samples = digit_samples(5)
    data = tar_bytes(samples)
    cut = member_offsets(data)["s0003.npy"][1] + 5
    url = write_bytes(f"{mem_url}/cut.tar", data[:cut])
    got = []
    with pytest.raises(ShardError, match="truncated or corrupt tar") as info:
        got.extend(read_tar(tar_ref(url)))
    assert [s.key for s in got] == ["s0000", "s0001", "s0002"]
    assert info.value.url == url and info.value.key == "s0002"
    assert url in str(info.value)


@pytest.mark.parametrize("member", ["s0003.cls", "end"])
def test_cut_at_a_member_boundary_is_truncation_not_a_clean_end(mem_url, member):
    # tarfile alone would end quietly here; the last sample may be missing members.
    samples = digit_samples(4)
    data = tar_bytes(samples)
    offsets = member_offsets(data)
    cut = offsets[member][0] if member != "end" else offsets["s0003.cls"][1] + 512
    url = write_bytes(f"{mem_url}/cut.tar", data[:cut])
    got = []
    with pytest.raises(ShardError, match="missing end-of-archive marker"):
        got.extend(s.key for s in read_tar(tar_ref(url)))
    assert got == ["s0000", "s0001", "s0002"]


def test_every_cut_point_gives_a_prefix_of_complete_samples(mem_url):
    samples = digit_samples(4)
    data = tar_bytes(samples)
    offsets = member_offsets(data)
    last = max(offsets.values())[1]
    end_of_members = last + 512 * -(-len(samples["s0003"]["cls"]) // 512)
    expected = [(k, v) for k, v in samples.items()]
    for cut in range(0, end_of_members + 512, 97):
        url = write_bytes(f"{mem_url}/cut.tar", data[:cut])
        got = []
        with pytest.raises(ShardError):
            got.extend((s.key, s.fields) for s in read_tar(tar_ref(url)))
        assert got == expected[: len(got)], cut
        assert len(got) < len(samples)


def test_corrupt_header_mid_shard_raises(mem_url):
    data = bytearray(tar_bytes(digit_samples(4)))
    header = member_offsets(bytes(data))["s0002.npy"][0]
    data[header : header + 100] = b"\xff" * 100
    url = write_bytes(f"{mem_url}/bad.tar", bytes(data))
    got = []
    with pytest.raises(ShardError, match="truncated or corrupt tar"):
        got.extend(s.key for s in read_tar(tar_ref(url)))
    assert got == ["s0000"]  # s0001 may have more members after the break: not yielded


def test_garbage_bytes_raise(mem_url):
    url = write_bytes(f"{mem_url}/bad.tar", b"this is not a tar file at all" * 40)
    with pytest.raises(ShardError, match="bad.tar"):
        list(read_tar(tar_ref(url)))


def test_gzipped_tar_reads_and_truncated_gzip_raises(mem_url):
    packed = gzip.compress(tar_bytes(digit_samples(3)), mtime=0)
    url = write_bytes(f"{mem_url}/a.tar", packed)
    assert len(list(read_tar(tar_ref(url)))) == 3
    url = write_bytes(f"{mem_url}/b.tar", packed[: len(packed) // 2])
    with pytest.raises(ShardError, match="truncated or corrupt tar"):
        list(read_tar(tar_ref(url)))


# --- tar: copying ------------------------------------------------------------------------


def test_copy_selected_tar_keeps_members_byte_identical(mem_url):
    members = [("a.png", b"A"), ("a.cls", b"0"), ("b.png", b"B"), ("c.png", b"C"), ("c.cls", b"1")]
    url = write_bytes(f"{mem_url}/in.tar", raw_tar(members, mtime=12345))
    out = io.BytesIO()
    assert copy_selected_tar(tar_ref(url), out, {"a": b'{"s":1}', "c": b'{"s":2}'}) == 2
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        got = [(m.name, tf.extractfile(m).read(), m.mtime) for m in tf.getmembers()]
    assert got == [
        ("a.png", b"A", 12345),
        ("a.cls", b"0", 12345),
        ("a.sage.json", b'{"s":1}', 0),
        ("c.png", b"C", 12345),
        ("c.cls", b"1", 12345),
        ("c.sage.json", b'{"s":2}', 0),
    ]


def test_copy_selected_replaces_old_sage_json_and_skips_flagged(mem_url):
    members = [("a.cls", b"0"), ("a.sage.json", b"old"), ("b.cls", b"1"), ("a.cls", b"9")]
    url = write_bytes(f"{mem_url}/in.tar", raw_tar(members))
    out = io.BytesIO()
    assert copy_selected(tar_ref(url), out, {"a": {"score": 0.5, "label": 0}}) == 1
    url2 = write_bytes(f"{mem_url}/out.tar", out.getvalue())
    (sample,) = read_tar(tar_ref(url2))
    assert sample.fields == {"cls": b"0", "sage.json": b'{"label":0,"score":0.5}'}


def test_copy_selected_tar_raises_on_truncated_input(mem_url):
    data = tar_bytes(digit_samples(3))
    url = write_bytes(f"{mem_url}/cut.tar", data[: len(data) // 3])
    with pytest.raises(ShardError, match="truncated or corrupt tar"):
        copy_selected_tar(tar_ref(url), io.BytesIO(), {"s0002": b"{}"})


def test_sage_json_is_compact_sorted_and_valid():
    record = {"score": float("nan"), "label": 3, "scorer": "sage", "energy": 0.25}
    assert sage_json(record) == b'{"energy":0.25,"label":3,"score":null,"scorer":"sage"}'
    assert json.loads(sage_json(record))["score"] is None


# --- parquet -----------------------------------------------------------------------------


def parquet_columns(n: int = 10) -> dict[str, list]:
    return {
        "__key__": [f"k{i:02d}" for i in range(n)],
        "x": [[float(i), float(i) + 0.5] for i in range(n)],
        "cls": [i % 3 for i in range(n)],
    }


def test_parquet_small_batches_give_every_row(mem_url):
    url = make_parquet_shard(f"{mem_url}/a.parquet", parquet_columns(10), row_group_size=4)
    got = list(read_parquet(pq_ref(url), batch_rows=3))
    assert [s.key for s in got] == [f"k{i:02d}" for i in range(10)]
    assert [s.index for s in got] == list(range(10))
    assert got[7].fields == {"x": [7.0, 7.5], "cls": 1}
    assert all(s.error is None and s.shard == "a.parquet" for s in got)


def test_parquet_without_key_column_uses_row_index(mem_url):
    columns = parquet_columns(3)
    del columns["__key__"]
    url = make_parquet_shard(f"{mem_url}/a.parquet", columns)
    assert [s.key for s in read_shard(pq_ref(url))] == ["000000000", "000000001", "000000002"]


def test_parquet_columns_and_missing_column(mem_url):
    url = make_parquet_shard(f"{mem_url}/a.parquet", parquet_columns(3))
    got = list(read_parquet(pq_ref(url), columns=["cls"]))
    assert [(s.key, s.fields) for s in got][0] == ("k00", {"cls": 0})
    with pytest.raises(ShardError, match="no column"):
        list(read_parquet(pq_ref(url), columns=["nope"]))


def test_parquet_duplicate_and_null_keys_are_flagged(mem_url):
    url = make_parquet_shard(f"{mem_url}/a.parquet", {"__key__": ["a", "b", "a", None]})
    got = [(s.key, s.error) for s in read_parquet(pq_ref(url), batch_rows=2)]
    assert got == [
        ("a", None),
        ("b", None),
        ("a", "duplicate key in shard"),
        ("000000003", "null key in column '__key__'"),
    ]


@pytest.mark.parametrize("content", [None, b"PAR1 but not really parquet"])
def test_unreadable_parquet_is_a_shard_error(mem_url, content):
    url = f"{mem_url}/bad.parquet"
    if content is not None:
        write_bytes(url, content)
    with pytest.raises(ShardError, match="bad.parquet"):
        list(read_parquet(pq_ref(url)))


def test_copy_selected_parquet_keeps_schema_and_adds_sage_columns(mem_url):
    table = pa.table(parquet_columns(6)).append_column("small", pa.array(range(6), pa.int8()))
    url = make_parquet_shard(f"{mem_url}/a.parquet", table, row_group_size=2)
    keep = {
        k: {
            "score": 0.1 * i,
            "label": i,
            "loss": 1.0,
            "grad_norm": 2.0,
            "energy": 0.5,
            "scorer": "sage",
        }
        for i, k in enumerate(["k04", "k01"])
    }
    out = io.BytesIO()
    assert copy_selected(pq_ref(url), out, keep) == 2
    got = pq.read_table(io.BytesIO(out.getvalue()))
    assert got.schema.names[:4] == table.schema.names
    assert [got.schema.field(n).type for n in table.schema.names] == list(table.schema.types)
    assert got.column("__key__").to_pylist() == ["k01", "k04"]  # input order, not keep order
    assert got.column("x").to_pylist() == [[1.0, 1.5], [4.0, 4.5]]
    assert got.schema.field("sage_label").type == pa.int64()
    assert got.schema.field("sage_score").type == pa.float64()
    assert got.column("sage_scorer").to_pylist() == ["sage", "sage"]
    assert got.column("sage_score").to_pylist() == [0.1, 0.0]
    again = io.BytesIO()
    copy_selected(pq_ref(url), again, keep)
    assert again.getvalue() == out.getvalue()


def test_copy_selected_parquet_nothing_kept_is_a_valid_file(mem_url):
    url = make_parquet_shard(f"{mem_url}/a.parquet", parquet_columns(3))
    out = io.BytesIO()
    assert copy_selected_parquet(pq_ref(url), out, {}) == 0
    got = pq.read_table(io.BytesIO(out.getvalue()))
    assert got.num_rows == 0
    assert got.schema.names[:3] == ["__key__", "x", "cls"]
    assert "sage_score" in got.schema.names


def test_copy_selected_parquet_replaces_existing_sage_columns_and_uses_row_keys(mem_url):
    url = make_parquet_shard(
        f"{mem_url}/a.parquet", {"v": [1, 2, 3], "sage_score": [9.0, 9.0, 9.0]}
    )
    out = io.BytesIO()
    copy_selected_parquet(pq_ref(url), out, {"000000002": {"score": 0.5}})
    got = pq.read_table(io.BytesIO(out.getvalue()))
    assert got.to_pylist() == [{"v": 3, "sage_score": 0.5}]


def test_non_utf8_binary_parquet_keys_stay_distinct(mem_url):
    """Issue 15, case 8: b"a\\xff" and b"a\\xfe" are two samples, not a false duplicate."""
    table = pa.table({"__key__": pa.array([b"a\xff", b"a\xfe", b"ok"], pa.binary()),
                      "x": [1, 2, 3]})  # fmt: skip
    url = make_parquet_shard(f"{mem_url}/k.parquet", table)
    samples = list(read_shard(pq_ref(url)))
    assert [(s.key, s.error) for s in samples] == [("a\\xff", None), ("a\\xfe", None), ("ok", None)]
    out = io.BytesIO()
    assert copy_selected(pq_ref(url), out, {"a\\xfe": {"score": 0.5}}) == 1
    out.seek(0)
    assert pq.read_table(out)["x"].to_pylist() == [2]
