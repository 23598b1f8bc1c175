"""One contract that every shard format must meet, run for tar and for Parquet.

Each format is described by a ``Format`` adapter: how to write a shard of ``(key, input,
label)`` specs with the shardmaker helpers, what the reader must give back for each spec, how
to look at a file's samples without the reader under test (``units``), and where its headers
are (to cut or corrupt them). The tests below are written once against the adapter:

1. read: every sample once, in order, with key, shard name, index and its fields;
2. grouping: all of a sample's fields in one Sample (tar: consecutive members; Parquet: a row);
3. truncation at every byte offset: a prefix of complete, correct samples, then ShardError
   naming the URL, exactly as many samples as the format's layout lets the reader prove whole;
4. corrupt headers and garbage: ShardError naming the URL, after a correct prefix at most;
5. copy-out: kept samples byte-identical plus their score record, in input order.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardmaker import make_parquet_shard, make_tar_shard, npy_bytes, png_bytes, write_bytes

from sage_stream.errors import ShardError
from sage_stream.formats import copy_selected, read_shard
from sage_stream.sample import Sample, ShardRef

Spec = tuple[str, np.ndarray, int]  # (key, input vector, label)
Unit = tuple[str, Any]  # (key, the sample's raw content as the file holds it)
BLOCK = 512  # tar block size


def specs(n: int, keys: list[str] | None = None) -> list[Spec]:
    """``n`` deterministic samples: float32 vectors of 4 and labels 0..2."""
    rng = np.random.default_rng(1234 + n)
    keys = keys or [f"s{i:04d}" for i in range(n)]
    return [(key, rng.standard_normal(4).astype(np.float32), i % 3) for i, key in enumerate(keys)]


def mask_png(label: int) -> bytes:
    """A tiny per-sample PNG: the third field, with a two-part name in tar (``seg.png``)."""
    return png_bytes(np.full((2, 2), 40 * label + 7, np.uint8))


# --- tar -----------------------------------------------------------------------------------


def tar_fields(x: np.ndarray, label: int) -> dict[str, bytes]:
    return {"npy": npy_bytes(x), "cls": str(label).encode(), "seg.png": mask_png(label)}


def tar_write(url: str, samples: list[Spec]) -> str:
    return make_tar_shard(url, [(key, tar_fields(x, label)) for key, x, label in samples])


def tar_decode(fields: dict[str, Any]) -> tuple[np.ndarray, int]:
    return np.load(io.BytesIO(fields["npy"]), allow_pickle=False), int(fields["cls"])


def tar_members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Every member of a tar with its data, parsed by tarfile (not by the reader under test)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]


def tar_units(data: bytes) -> list[Unit]:
    """Consecutive members with one key: (key, [(name, bytes, header fields), ...])."""
    units: list[Unit] = []
    for info, payload in tar_members(data):
        key = info.name.split(".", 1)[0]  # test keys never hold a dot
        header = (info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname)
        if not units or units[-1][0] != key:
            units.append((key, []))
        units[-1][1].append((info.name, payload, header))
    return units


def tar_split_record(key: str, unit: list) -> tuple[list, dict]:
    """The members copied from the input, and the decoded ``<key>.sage.json`` member."""
    records = [payload for name, payload, _ in unit if name == f"{key}.sage.json"]
    assert len(records) == 1, f"{key}: {len(records)} sage.json members"
    assert unit[-1][0] == f"{key}.sage.json", f"{key}: the score member is not last"
    return [m for m in unit if m[0] != f"{key}.sage.json"], json.loads(records[0])


def tar_layout(data: bytes) -> tuple[list[int], int, list[int]]:
    """(header offset of each sample's first member, end-of-members offset, every header)."""
    firsts: dict[str, int] = {}
    headers = []
    end = 0
    for info, _ in tar_members(data):
        firsts.setdefault(info.name.split(".", 1)[0], info.offset)
        headers.append(info.offset)
        end = info.offset_data + BLOCK * -(-info.size // BLOCK)
    return list(firsts.values()), end, headers


def tar_survivors(data: bytes) -> Callable[[int], int]:
    """How many samples the reader can prove whole when the stream breaks at ``offset``.

    A sample is complete once the next sample's first header has been read whole; the last
    one once the end-of-archive zero block has. A break anywhere else leaves a sample pending,
    which must be dropped.
    """
    firsts, end, _ = tar_layout(data)

    def survivors(offset: int) -> int:
        proven = sum(1 for start in firsts[1:] if offset >= start + BLOCK)
        return proven + (offset >= end + BLOCK)

    return survivors


def tar_complete_at(data: bytes) -> int:
    """The shortest prefix that holds every member and the end-of-archive zero block."""
    return tar_layout(data)[1] + BLOCK


def tar_cut_points(data: bytes) -> list[int]:
    """Every 37th byte, plus each side of every block boundary and of every member's data end.

    A tar reader's outcome can only change where a 512-byte block or a member's data ends;
    trying every byte of a 10 KiB shard would take seconds for nothing more.
    """
    edges = set(range(0, len(data) + 1, BLOCK))
    edges |= {info.offset_data + info.size for info, _ in tar_members(data)}
    points = set(range(0, len(data) + 1, 37))
    points |= {p for edge in edges for p in (edge - 1, edge, edge + 1)}
    return sorted(p for p in points if 0 <= p <= len(data))


def set_tar_size(block: bytes, size: int) -> bytes:
    """A ustar header block with another size field and a checksum that still matches."""
    header = bytearray(block)
    header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def overwrite(data: bytes, offset: int, replacement: bytes) -> bytes:
    out = bytearray(data)
    out[offset : offset + len(replacement)] = replacement
    assert len(out) == len(data)
    return bytes(out)


def tar_header(data: bytes, sample: int, member: int) -> int:
    """Offset of the header of member ``member`` (0, 1, 2) of sample ``sample``."""
    return tar_layout(data)[2][3 * sample + member]


# --- Parquet -------------------------------------------------------------------------------

PQ_SCHEMA = pa.schema(
    [
        ("__key__", pa.string()),
        ("x", pa.list_(pa.float32())),
        ("cls", pa.int64()),
        ("seg.png", pa.binary()),
    ]
)


def pq_fields(x: np.ndarray, label: int) -> dict[str, Any]:
    return {"x": x.tolist(), "cls": label, "seg.png": mask_png(label)}


def pq_write(url: str, samples: list[Spec]) -> str:
    rows = [{"__key__": key, **pq_fields(x, label)} for key, x, label in samples]
    table = pa.Table.from_pylist(rows, schema=PQ_SCHEMA)
    return make_parquet_shard(url, table, row_group_size=1)  # one row group per sample


def pq_decode(fields: dict[str, Any]) -> tuple[np.ndarray, int]:
    return np.asarray(fields["x"], dtype=np.float32), fields["cls"]


def pq_units(data: bytes) -> list[Unit]:
    """Each row as a dict of every column, read with pyarrow (not by the reader under test)."""
    return [(row["__key__"], row) for row in pq.read_table(io.BytesIO(data)).to_pylist()]


def pq_split_record(key: str, row: dict) -> tuple[dict, dict]:
    original = {k: v for k, v in row.items() if not k.startswith("sage_")}
    return original, {k.removeprefix("sage_"): v for k, v in row.items() if k.startswith("sage_")}


def pq_original_schema(data: bytes) -> pa.Schema:
    schema = pq.read_schema(io.BytesIO(data))
    return pa.schema([f for f in schema if not f.name.startswith("sage_")], schema.metadata)


def pq_page_header(data: bytes, row_group: int, column: int) -> int:
    """Offset of the first page header (dictionary page if any) of one column chunk."""
    chunk = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(row_group).column(column)
    offsets = [chunk.data_page_offset, chunk.dictionary_page_offset]
    return min(o for o in offsets if o is not None and o > 0)


def pq_footer(data: bytes) -> int:
    """Offset of the footer's thrift metadata (before its 4-byte length and ``PAR1``)."""
    (length,) = struct.unpack("<I", data[-8:-4])
    return len(data) - 8 - length


# --- the adapters --------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    fields_of: Callable[[np.ndarray, int], dict[str, Any]]  # what Sample.fields must be
    write: Callable[[str, list[Spec]], str]  # url, specs -> url
    decode: Callable[[dict[str, Any]], tuple[np.ndarray, int]]  # fields -> (input, label)
    units: Callable[[bytes], list[Unit]]
    split_record: Callable[[str, Any], tuple[Any, dict]]  # output unit -> (original, record)
    survivors: Callable[[bytes], Callable[[int], int]]  # data -> (cut/break offset -> count)
    complete_at: Callable[[bytes], int]  # shortest prefix the reader may accept as whole
    cut_points: Callable[[bytes], list[int]]  # where to cut a file in the truncation test
    score_field: Callable[[str], bool]  # a field of a read-back output holding the record
    original_schema: Callable[[bytes], Any] | None = None
    corruptions: dict[str, Any] = field(default_factory=dict)

    def ref(self, url: str) -> ShardRef:
        return ShardRef(url=url, name=url.rsplit("/", 1)[-1], format=self.name)  # type: ignore[arg-type]

    def url(self, root: str, stem: str) -> str:
        return f"{root}/{stem}{self.suffix}"

    def shard_bytes(self, root: str, samples: list[Spec]) -> bytes:
        """The bytes of a shard of ``samples`` as ``write`` makes it."""
        url = self.write(self.url(root, "source"), samples)
        with fsspec.open(url, "rb") as f:
            return f.read()


TAR = Format(
    name="tar",
    suffix=".tar",
    fields_of=tar_fields,
    write=tar_write,
    decode=tar_decode,
    units=tar_units,
    split_record=tar_split_record,
    survivors=tar_survivors,
    complete_at=tar_complete_at,
    cut_points=tar_cut_points,
    score_field=lambda name: name == "sage.json",
)
PARQUET = Format(
    name="parquet",
    suffix=".parquet",
    fields_of=pq_fields,
    write=pq_write,
    decode=pq_decode,
    units=pq_units,
    split_record=pq_split_record,
    # the footer is at the end: a cut file cannot be opened, so no sample ever comes out
    survivors=lambda data: lambda offset: 0,
    complete_at=len,
    cut_points=lambda data: list(range(len(data) + 1)),  # every byte: 2-3 KiB
    score_field=lambda name: name.startswith("sage_"),
    original_schema=pq_original_schema,
)
FORMATS = {f.name: f for f in (TAR, PARQUET)}


@pytest.fixture(params=list(FORMATS))
def fmt(request) -> Format:
    return FORMATS[request.param]


def expected_samples(fmt: Format, samples: list[Spec], shard: str) -> list[tuple]:
    return [(key, shard, i, fmt.fields_of(x, y), None) for i, (key, x, y) in enumerate(samples)]


def as_tuple(sample: Sample) -> tuple:
    return (sample.key, sample.shard, sample.index, sample.fields, sample.error)


def read_until_error(fmt: Format, url: str, **kw: Any) -> tuple[list[tuple], ShardError | None]:
    """Every sample read before the reader stops, and the ShardError it stopped with."""
    got: list[tuple] = []
    try:
        for sample in read_shard(fmt.ref(url), **kw):
            got.append(as_tuple(sample))
    except ShardError as e:
        return got, e
    return got, None


def assert_names(err: ShardError | None, url: str, got: list[tuple]) -> None:
    assert err is not None, f"{url}: read as complete"
    assert err.url == url and url in str(err)
    assert err.key == (got[-1][0] if got else None)  # the last sample known complete


# --- 1. read -------------------------------------------------------------------------------


def test_read_gives_every_sample_once_in_order(fmt, mem_url):
    samples = specs(5)
    url = fmt.write(fmt.url(mem_url, "a"), samples)
    got = list(read_shard(fmt.ref(url)))
    assert [as_tuple(s) for s in got] == expected_samples(fmt, samples, f"a{fmt.suffix}")
    for sample, (_, x, label) in zip(got, samples, strict=True):
        assert list(sample.fields) == list(fmt.fields_of(x, label))  # the written field order
        vector, cls = fmt.decode(sample.fields)
        assert vector.dtype == np.float32 and np.array_equal(vector, x)
        assert cls == label


def test_reading_twice_gives_the_same_samples(fmt, mem_url):
    url = fmt.write(fmt.url(mem_url, "a"), specs(3))
    first = [as_tuple(s) for s in read_shard(fmt.ref(url))]
    assert [as_tuple(s) for s in read_shard(fmt.ref(url))] == first
    assert len(first) == 3


def test_duplicate_key_is_flagged_and_never_copied(fmt, mem_url):
    samples = specs(3, keys=["a", "b", "a"])
    url = fmt.write(fmt.url(mem_url, "dup"), samples)
    got = [(s.key, s.index, s.error) for s in read_shard(fmt.ref(url))]
    assert got == [("a", 0, None), ("b", 1, None), ("a", 2, "duplicate key in shard")]
    out = io.BytesIO()
    assert copy_selected(fmt.ref(url), out, {"a": record(0), "b": record(1)}) == 2
    copied = [fmt.split_record(k, unit)[0] for k, unit in fmt.units(out.getvalue())]
    source = fmt.units(fmt.shard_bytes(mem_url, samples))
    assert copied == [source[0][1], source[1][1]]  # the first "a", never the flagged one


# --- 2. grouping ---------------------------------------------------------------------------


def test_all_fields_of_a_sample_are_in_one_sample(fmt, mem_url):
    samples = specs(3, keys=["train/a", "train/b", "val/c"])
    url = fmt.write(fmt.url(mem_url, "g"), samples)
    got = list(read_shard(fmt.ref(url)))
    # one Sample per written sample (tar: 3 members each; Parquet: 4 columns per row)
    assert [s.key for s in got] == ["train/a", "train/b", "val/c"]
    for sample, (_, x, label) in zip(got, samples, strict=True):
        assert set(sample.fields) == {*fmt.fields_of(x, label)}
        assert sample.fields["seg.png"] == mask_png(label)  # the field of this sample, no other
        assert fmt.decode(sample.fields)[1] == label


# --- 3. truncation -------------------------------------------------------------------------


def test_every_cut_point_gives_complete_samples_then_shard_error(fmt, mem_url):
    samples = specs(3)
    data = fmt.shard_bytes(mem_url, samples)
    expected = expected_samples(fmt, samples, f"cut{fmt.suffix}")
    survivors = fmt.survivors(data)
    complete_at = fmt.complete_at(data)
    assert 0 < complete_at <= len(data)
    url = fmt.url(mem_url, "cut")
    partial_outcomes = set()
    cuts = fmt.cut_points(data)
    assert cuts[0] == 0 and cuts[-1] == len(data) and complete_at - 1 in cuts
    for cut in cuts:
        write_bytes(url, data[:cut])
        got, err = read_until_error(fmt, url)
        if cut >= complete_at:  # only padding after the end marker is missing
            assert (got, err) == (expected, None), cut
            continue
        assert_names(err, url, got)
        assert got == expected[: len(got)], cut  # complete, correct samples only
        assert len(got) == survivors(cut), cut  # every sample provably whole, no more
        partial_outcomes.add(len(got))
    # the tiny tar breaks after 0, 1 and 2 complete samples; Parquet never yields any
    assert partial_outcomes == ({0, 1, 2} if fmt is TAR else {0})


def test_copy_from_a_shard_cut_before_a_kept_sample_raises(fmt, mem_url):
    samples = specs(3)
    data = fmt.shard_bytes(mem_url, samples)
    url = write_bytes(fmt.url(mem_url, "cut"), data[: len(data) // 2])
    with pytest.raises(ShardError) as info:
        copy_selected(fmt.ref(url), io.BytesIO(), {"s0002": record(2)})
    assert info.value.url == url and url in str(info.value)


# --- 4. corrupt headers and garbage --------------------------------------------------------

Corruption = Callable[[bytes], tuple[bytes, int | None]]  # -> (bad file, survivors or None)
GARBAGE = np.random.default_rng(7).bytes(3000)
TEXT = b"this is not a shard at all\n" * 100

TAR_CORRUPTIONS: dict[str, Corruption] = {
    # a checksum that is not octal: sample 0 is still pending when sample 1's header breaks
    "bad checksum, sample 1 first header": lambda d: (
        overwrite(d, tar_header(d, 1, 0) + 148, b"9" * 8),
        0,
    ),
    "0xff over sample 2 second header": lambda d: (
        overwrite(d, tar_header(d, 2, 1), b"\xff" * BLOCK),
        2,
    ),
    # a valid header whose size runs past the end of the file
    "size past EOF, sample 1 second header": lambda d: (
        overwrite(
            d,
            tar_header(d, 1, 1),
            set_tar_size(d[tar_header(d, 1, 1) :][:BLOCK], 10**6),
        ),
        1,
    ),
    # a zero block is tar's end-of-archive marker: mid-shard it hides the rest of the shard
    "zeroed sample 1 second header": lambda d: (
        overwrite(d, tar_header(d, 1, 1), b"\0" * BLOCK),
        1,
    ),
    "random bytes": lambda d: (GARBAGE, 0),
    "text": lambda d: (TEXT, 0),
}
PQ_CORRUPTIONS: dict[str, Corruption] = {
    "0xff over footer metadata": lambda d: (overwrite(d, pq_footer(d), b"\xff" * 32), 0),
    "footer length past the start": lambda d: (
        overwrite(d, len(d) - 8, struct.pack("<I", len(d) + 100)),
        0,
    ),
    "bad trailing magic": lambda d: (overwrite(d, len(d) - 4, b"PAR0"), 0),
    "random bytes": lambda d: (GARBAGE, 0),
    "random bytes ending in PAR1": lambda d: (GARBAGE + b"PAR1", 0),
    "text": lambda d: (TEXT, 0),
}
# Parquet cases read one row per batch, so that any rows before the break can come out (and
# must be correct).
PQ_KW = {"batch_rows": 1}
# A page that does not decode spoils its row group only: (corrupted bytes, the bad row group,
# whether its key column still decodes). The shard has one row group per sample.
PQ_ROW_GROUP_CORRUPTIONS: dict[str, Callable[[bytes], tuple[bytes, int, bool]]] = {
    "0xff over row group 0 key page": lambda d: (
        overwrite(d, pq_page_header(d, 0, 0), b"\xff" * 16),
        0,
        False,
    ),
    "zeroed row group 2 page header": lambda d: (
        overwrite(d, pq_page_header(d, 2, 1), b"\0" * 16),
        2,
        True,
    ),
    "0xff over row group 1 page header": lambda d: (
        overwrite(d, pq_page_header(d, 1, 2), b"\xff" * 16),
        1,
        True,
    ),
}


def corruption_cases() -> list:
    cases = []
    for name, corrupt in TAR_CORRUPTIONS.items():
        cases.append(pytest.param("tar", corrupt, {}, id=f"tar-{name}"))
    for name, corrupt in PQ_CORRUPTIONS.items():
        cases.append(pytest.param("parquet", corrupt, PQ_KW, id=f"parquet-{name}"))
    return cases


@pytest.mark.parametrize(("format_name", "corrupt", "kw"), corruption_cases())
def test_corrupt_header_or_garbage_is_a_shard_error(mem_url, format_name, corrupt, kw):
    fmt = FORMATS[format_name]
    samples = specs(4)
    bad, survivors = corrupt(fmt.shard_bytes(mem_url, samples))
    url = write_bytes(fmt.url(mem_url, "bad"), bad)
    got, err = read_until_error(fmt, url, **kw)
    assert_names(err, url, got)
    assert got == expected_samples(fmt, samples, f"bad{fmt.suffix}")[: len(got)]
    assert len(got) < len(samples)
    if survivors is not None:
        assert len(got) == survivors


@pytest.mark.parametrize("kw", [PQ_KW, {}], ids=["one-row-batches", "default-batches"])
@pytest.mark.parametrize("name", list(PQ_ROW_GROUP_CORRUPTIONS))
def test_a_corrupt_parquet_row_group_is_error_rows_and_the_shard_goes_on(mem_url, name, kw):
    fmt = FORMATS["parquet"]
    samples = specs(4)
    bad, group, key_readable = PQ_ROW_GROUP_CORRUPTIONS[name](fmt.shard_bytes(mem_url, samples))
    url = write_bytes(fmt.url(mem_url, "bad"), bad)
    got, err = read_until_error(fmt, url, **kw)
    assert err is None
    expected = expected_samples(fmt, samples, "bad.parquet")
    assert len(got) == len(samples)  # the footer's row count: every row is accounted for
    assert [g for i, g in enumerate(got) if i != group] == expected[:group] + expected[group + 1 :]
    key, shard, index, fields, error = got[group]
    assert (shard, index, fields) == ("bad.parquet", group, {})
    assert key == (samples[group][0] if key_readable else f"{group:09d}")
    assert error is not None and f"row group {group}" in error


# --- 5. copy-out ---------------------------------------------------------------------------


def record(i: int) -> dict[str, object]:
    """A score record as emit makes it; every float is exact in binary and in JSON."""
    return {
        "score": 0.25 * (i + 1),
        "label": i % 3,
        "loss": 0.5 + i,
        "grad_norm": 1.25,
        "energy": -0.5,
        "scorer": "sage",
    }


RECORD_TYPES = {
    "score": float,
    "label": int,
    "loss": float,
    "grad_norm": float,
    "energy": float,
    "scorer": str,
}


@pytest.mark.parametrize(
    "kept",
    [[0, 1, 2, 3], [3, 0, 2], [3], []],  # keep's order is never the output's order
    ids=["all", "some", "last", "none"],
)
def test_copy_selected_copies_kept_samples_with_their_score(fmt, mem_url, kept):
    samples = specs(4)
    url = fmt.write(fmt.url(mem_url, "in"), samples)
    source = fmt.units(fmt.shard_bytes(mem_url, samples))
    keys = [samples[i][0] for i in kept]
    keep = {samples[i][0]: record(i) for i in kept}
    out = io.BytesIO()

    assert copy_selected(fmt.ref(url), out, keep) == len(kept)

    data = out.getvalue()
    copied = fmt.units(data)  # a valid file of its format, even with nothing kept
    in_order = [(k, unit) for k, unit in source if k in keep]
    assert [k for k, _ in copied] == [k for k, _ in in_order] == sorted(keys)
    for (key, unit), (_, original) in zip(copied, in_order, strict=True):
        fields, rec = fmt.split_record(key, unit)
        assert fields == original  # every original member / column value, byte for byte
        assert rec == keep[key]
        assert {k: type(v) for k, v in rec.items()} == RECORD_TYPES
    if fmt.original_schema is not None:  # Parquet: the original columns, types and order
        assert fmt.original_schema(data) == fmt.original_schema(fmt.shard_bytes(mem_url, samples))
        assert fmt.original_schema(data).names == PQ_SCHEMA.names

    # the reader reads the output back as exactly the kept samples, with their scores
    out_url = write_bytes(fmt.url(mem_url, "out"), data)
    back = list(read_shard(fmt.ref(out_url)))
    by_key = {key: (x, y) for key, x, y in samples}
    assert [(s.key, s.index, s.shard, s.error) for s in back] == [
        (k, i, f"out{fmt.suffix}", None) for i, k in enumerate(sorted(keys))
    ]
    for sample in back:
        original = {k: v for k, v in sample.fields.items() if not fmt.score_field(k)}
        assert original == fmt.fields_of(*by_key[sample.key])
        assert any(fmt.score_field(k) for k in sample.fields)

    again = io.BytesIO()
    copy_selected(fmt.ref(url), again, keep)
    assert again.getvalue() == data  # deterministic
