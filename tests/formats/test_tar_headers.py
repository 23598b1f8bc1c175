"""Hostile tar headers (issue 25, defects 1 and 2): no header value sets the work or memory.

Every case is read in a forked child under CPU-time and address-space limits
(``helpers/bounded_read.py``), all in one subprocess per module, so a regression shows as a
``timeout``/``signal`` status or a ``MemoryError`` crash instead of a hung test run.

1. A claimed size (pax ``size=``, a base-256 size field) far beyond the stream: the stream is
   read past by the bytes that are there; the shard ends with a reason naming the claim.
2. A pax header or GNU long name over ``MAX_HEADER_BYTES`` (plain and inside gzip) is streamed
   past unread: its member's sample is an error row and the shard goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hostile_tars import (
    END,
    gzip_bytes,
    header,
    long_name,
    member,
    pax,
    pax_record,
    sample,
    write_big_header_tgz,
)
from paths import HELPERS, child_env

from sage_stream.formats.tar_headers import MAX_HEADER_BYTES

BIG = 128 * 2**20  # a header that today's tarfile would read whole: over the child's 192 MiB


def cases(tmp) -> dict[str, bytes]:
    claim = 10**12
    return {
        "pax-size-claim": sample("s0") + pax(pax_record("size", str(claim))) + header("s1.npy")
        + b"x" * 70_000,
        "base256-claim": sample("s0") + header("s1.npy", claim) + b"x" * 70_000,
        "claim-unread-key": sample("s0") + header("s1.npy", 100 * 2**20) + b"x" * 5000,
        "negative-size": sample("s0") + header("s1.npy", -(10**9)) + sample("s2") + END,
        "pax-over-limit": sample("s0") + pax(b"", claim=MAX_HEADER_BYTES + 1)
        + b"\0" * (MAX_HEADER_BYTES + 512) + sample("s1") + sample("s2") + END,
        "long-name-over-limit": sample("s0") + long_name(b"n" * (MAX_HEADER_BYTES + 1))
        + sample("s1") + sample("s2") + END,
        "pax-chain": sample("s0") + pax(pax_record("comment", "x")) * 200 + sample("s1") + END,
        "sparse-map-loop": sample("s0") + header("s1.npy", 0, b"S", raw={482: b"\1"})
        + header("", 0, b"\0", raw={504: b"\1"}) * 5000,
        "pax-claim-in-gzip": gzip_bytes(sample("s0") + pax(pax_record("size", str(claim)))
                                        + member("s1.npy", b"x" * 70_000)),
    }  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("headers")
    paths = []
    for name, data in cases(root).items():
        suffix = ".tar.gz" if "gzip" in name else ".tar"
        path = root / f"{name}{suffix}"
        path.write_bytes(data)
        paths.append(str(path))
    for kind in ("pax", "long"):
        paths.append(str(write_big_header_tgz(root / f"big-{kind}.tar.gz", kind, BIG)))
    done = subprocess.run([sys.executable, "-m", "bounded_read", *paths], env=child_env(),
                          cwd=str(HELPERS), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = {}
    for line in done.stdout.splitlines():
        row = json.loads(line)
        name = row.pop("shard").rsplit("/", 1)[1].split(".")[0]
        out[name] = row
    return out


def clean(row: dict) -> dict:
    assert row["status"] == "ok", row  # no hang (timeout, SIGXCPU) and no kill
    assert row["crash"] is None, row
    assert row["growth_kib"] < 64 * 1024, row  # bounded memory, whatever the header claims
    return row


@pytest.mark.parametrize("name", ["pax-size-claim", "base256-claim", "pax-claim-in-gzip"])
def test_a_claimed_size_beyond_the_stream_ends_the_shard_at_once(results, name):
    row = clean(results[name])
    assert row["samples"] == 1 and row["errors"] == []  # the sample before it came out
    assert "claims" in row["shard_error"] and "s1.npy" in row["shard_error"]


def test_a_claim_under_the_member_cap_is_read_to_the_stream_end(results):
    row = clean(results["claim-unread-key"])
    assert row["samples"] == 1 and "truncated or corrupt tar" in row["shard_error"]


def test_a_negative_size_is_recorded(results):
    row = clean(results["negative-size"])
    assert row["shard_error"] is not None and "negative size" in row["shard_error"]


@pytest.mark.parametrize("name", ["pax-over-limit", "long-name-over-limit"])
def test_an_oversized_header_makes_an_error_row_and_the_shard_goes_on(results, name):
    row = clean(results[name])
    assert row["shard_error"] is None and row["samples"] == 3
    (reason,) = row["errors"]
    assert "over the limit" in reason and ("pax" in reason or "long name" in reason)


@pytest.mark.parametrize("kind", ["pax", "long"])
def test_a_huge_header_inside_gzip_is_read_past_in_bounded_memory(results, kind):
    row = clean(results[f"big-{kind}"])
    assert row["shard_error"] is None and row["samples"] == 3
    assert len(row["errors"]) == 1 and "over the limit" in row["errors"][0]


@pytest.mark.parametrize(("name", "reason"), [("pax-chain", "extended headers in front"),
                                              ("sparse-map-loop", "sparse map")])  # fmt: skip
def test_header_chains_and_endless_sparse_maps_end_the_shard(results, name, reason):
    row = clean(results[name])
    assert row["samples"] == 0 and reason in row["shard_error"], row


def test_ordinary_pax_headers_read_as_the_stdlib_reads_them():
    # the strict pax parser changes nothing for well-formed shards: names (non-UTF-8 ones,
    # long ones, hdrcharset=BINARY given globally) come out as tarfile's own reader gives them
    import io
    import tarfile

    from sage_stream.formats.tar_headers import CheckedTarInfo

    def archive(**kw: object) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, **kw) as tf:
            for name in ["ascii.txt", "caf\xe9.txt", "x" * 300 + ".npy"]:
                info = tarfile.TarInfo(name)
                info.size, info.pax_headers = 1, {"mtime": "1.5", "comment": "c"}
                tf.addfile(info, io.BytesIO(b"a"))
        return buf.getvalue()

    def members(data: bytes, cls: type) -> list[tuple]:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*", tarinfo=cls) as tf:
            return [(m.name, m.size, m.mtime, m.pax_headers) for m in tf]

    for data in (archive(encoding="latin-1"),
                 archive(pax_headers={"hdrcharset": "BINARY"}, encoding="latin-1")):  # fmt: skip
        assert members(data, CheckedTarInfo) == members(data, tarfile.TarInfo)


_FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname", "uname",
           "gname", "devmajor", "devminor", "_sparse_structs")  # fmt: skip


def _parsed(cls: type, block: bytes) -> tuple:
    import tarfile

    try:
        info = cls.frombuf(block, "utf-8", "surrogateescape")
    except (tarfile.HeaderError, ValueError) as e:
        return ("error", type(e).__name__, str(e))
    return tuple(getattr(info, f, None) for f in _FIELDS)


def _fuzzed_block(rng) -> bytes:
    """A header block as writers make them (ustar, GNU, pax; prefixes, folders, links, names
    with high bytes), then with number fields and bytes changed, checksum right or not."""
    import tarfile

    name = rng.choice(["a.npy", "d/", "x" * 99 + "/" + "y.cls", "caf\xe9.txt", "p/" * 60 + "z"])
    info = tarfile.TarInfo(name)
    info.type = rng.choice([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                            tarfile.GNUTYPE_SPARSE, b"7", b"Z"])  # fmt: skip
    info.size, info.mtime, info.mode = rng.randrange(8**11), rng.randrange(8**11), 0o644
    info.linkname = rng.choice(["", "t\xe9"])
    fmt = rng.choice([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
    try:  # the member's own block: the last (GNU puts a long name's blocks first)
        block = bytearray(info.tobuf(format=fmt, encoding="utf-8")[-512:])
    except ValueError:  # a name ustar cannot hold
        block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT)[-512:])
    numbers = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)]
    for _ in range(rng.choice([0, 0, 1, 2])):
        offset, width = rng.choice(numbers)
        value = rng.choice([b" 644", b"644 ", b"+17", b"-17", b"1_7", b"0o17", b"89", b"\0" * 3,
                            b"7\x0012", b"  ", b"\x80" + b"\1" * (width - 1), b"\xff" * width,
                            bytes(rng.randrange(256) for _ in range(width))])  # fmt: skip
        block[offset : offset + width] = value[:width].ljust(width, rng.choice([b"\0", b" "]))
    if rng.random() < 0.2:
        block[rng.randrange(512)] = rng.randrange(256)
    block[148:156] = b" " * 8
    total = rng.choice(["unsigned", "unsigned", "signed", "wrong"])
    chksum = {"unsigned": sum(block), "wrong": sum(block) + 1,
              "signed": sum(b - 256 if b > 127 else b for b in block)}[total]  # fmt: skip
    block[148:156] = f"{chksum & 0o777777:06o}\0 ".encode()
    return bytes(block)


def test_the_quick_header_path_parses_as_tarfile_does():
    # CheckedTarInfo.frombuf parses common blocks itself: on every block, the same fields or
    # the same error as tarfile's own frombuf (the rest of the bounds never see a difference)
    import random
    import tarfile

    from sage_stream.formats.tar_headers import CheckedTarInfo, _byte_sum, _common_header

    rng = random.Random(24)
    blocks = [_fuzzed_block(rng) for _ in range(3000)] + [b"\0" * 512, b"\0" * 100, b""]
    for block in [b"\xff" * 512, *(rng.randbytes(512) for _ in range(200)), *blocks[:100]]:
        assert _byte_sum(block) == sum(block)
    quick = sum(_common_header(b) is not None for b in blocks if len(b) == 512)
    assert 500 < quick < len(blocks) - 500  # both paths are exercised
    for block in blocks:
        assert _parsed(CheckedTarInfo, block) == _parsed(tarfile.TarInfo, block), block
    for block in blocks:  # a second time: the number fields now come from the cache
        assert _parsed(CheckedTarInfo, block) == _parsed(tarfile.TarInfo, block), block


def test_the_number_field_cache_stays_bounded_whatever_the_headers():
    from sage_stream.formats import tar_headers

    for size in range(3 * tar_headers._OCTAL_FIELDS_MAX):  # every header a new size
        block = bytearray(512)
        block[124:136] = f"{size:011o}\0".encode()
        block[148:156] = f"{256 + sum(block) - 0:06o}\0 ".encode()
        tar_headers._common_header(bytes(block))
        assert len(tar_headers._OCTAL_FIELDS) <= tar_headers._OCTAL_FIELDS_MAX
    assert tar_headers._plain_octal(b"0000644\0") == 0o644
    assert tar_headers._plain_octal(b"00 644\0") == -1  # a space inside: tarfile's path


def test_output_shards_are_the_bytes_tarfile_would_write():
    # TarShardWriter writes plain headers itself (tar_headers.plain_header) and leaves the
    # rest (non-ASCII or long names, float or huge mtimes) to tarfile: either way, the bytes
    # of tarfile.addfile in PAX format, plain and gzipped
    import gzip
    import io
    import random
    import tarfile

    from sage_stream.formats.tar import TarShardWriter, safe_mode

    rng = random.Random(7)
    members = []
    for i in range(300):
        name = rng.choice([f"k{i}.npy", "d/" * 30 + f"{i}.x", "x" * (96 - len(str(i))) + f"{i}.cls",
                           f"caf\xe9{i}.txt", "y" * 120 + f"{i}.png", f"sp ace{i}.a b"])  # fmt: skip
        like = tarfile.TarInfo(name)
        like.mtime = rng.choice([0, 1_700_000_000, 1.5, 8**11, 8**11 - 1, True])
        like.mode = rng.choice([0o644, 0o4755, 0o777, 0o7777, 0o1000])
        # sizes up to several of tarfile's 10,240-byte records: data is written a record at a time
        data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, 3000, 10240, 10241, 50_000]))
        members.append((name, data, like if rng.random() < 0.8 else None))

    def ours(fileobj) -> None:
        with TarShardWriter(fileobj) as writer:
            for name, data, like in members:
                writer.write_member(name, data, like=like)

    def theirs(fileobj) -> None:  # what write_member did before, through tarfile
        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name, data, like in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                if like is not None:
                    info.mtime, info.mode = like.mtime, safe_mode(like.mode)
                tar.addfile(info, io.BytesIO(data))

    for wrap in (lambda f: f, lambda f: gzip.GzipFile(fileobj=f, mode="wb", mtime=0)):
        got, want = io.BytesIO(), io.BytesIO()
        for write, buf in ((ours, got), (theirs, want)):
            out = wrap(buf)
            write(out)
            if out is not buf:
                out.close()
        assert got.getvalue() == want.getvalue()


def test_output_counts_are_tarfiles_counts():
    # TarFormat.count walks plain headers itself (tar_headers.count_plain) and leaves the rest
    # to tarfile: the same count, or the same refusal, on whole, cut, gzipped, empty archives
    import gzip
    import io
    import random
    import tarfile

    from sage_stream.formats import TarFormat
    from sage_stream.formats.tar import TarShardWriter
    from sage_stream.formats.tar_headers import CheckedTarInfo, count_plain

    def counted(count, data: bytes):
        try:
            return count(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - the refusal is compared too
            return type(e)

    def tarfiles(f) -> int:
        with tarfile.open(fileobj=f, mode="r:*", tarinfo=CheckedTarInfo) as tf:
            return sum(1 for m in tf if m.name.endswith(".sage.json"))

    rng = random.Random(3)
    archives = [b"", END, b"\0" * 512]
    for n in (1, 2, 5, 40):
        buf = io.BytesIO()
        with TarShardWriter(buf) as writer:
            for i in range(n):
                name = rng.choice([f"k{i}.sage.json", f"k{i}.npy", "y" * 120 + f"{i}.sage.json",
                                   f"caf\xe9{i}.sage.json", f"d{i}/"])  # fmt: skip
                writer.write_member(name, rng.randbytes(rng.choice([0, 1, 512, 700])))
        whole = buf.getvalue()
        cuts = [whole[: rng.randrange(len(whole))] for _ in range(5)]
        archives += [whole, gzip.compress(whole, mtime=0), whole[:-1024], *cuts]
    walked = 0
    for data in archives:
        assert counted(TarFormat().count, data) == counted(tarfiles, data), data[:600]
        walked += count_plain(io.BytesIO(data), b".sage.json") is not None
    assert 5 < walked < len(archives) - 5  # both paths answered
