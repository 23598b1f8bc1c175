"""Header fuzz (issue 25): generated tar and tar.gz streams with random, huge, negative and
malformed header fields: pax records (global and extended), GNU long names and links, GNU
sparse headers, octal and base-256 sizes, typeflags, raw field bytes, cut streams.

Each stream is read in a forked child under a CPU-time and an address-space limit
(``helpers/bounded_read.py``). Every read must end (no timeout, no SIGXCPU), raise nothing but
ShardError, and stay within a memory bound; a stream whose header claims what the stream
cannot hold must end with a recorded error (an error row or a shard error). The generator is
seeded, so a failure names a case that reproduces.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from hostile_tars import (
    END,
    gzip_bytes,
    header,
    pax,
    pax_record,
    sample,
    size_field,
)
from paths import HELPERS, child_env

CASES = 120
HUGE = [10**12, 2**80, 8**11, 2**63, 10**30]
NEGATIVE = [-1, -512, -(10**9), -(2**80)]
KEYWORDS = ["path", "linkpath", "size", "mtime", "uid", "gid", "uname", "hdrcharset", "comment",
            "GNU.sparse.size", "GNU.sparse.realsize", "GNU.sparse.map", "GNU.sparse.major",
            "GNU.sparse.minor", "GNU.sparse.name", "SCHILY.xattr.user.x"]  # fmt: skip


def value(rng: random.Random) -> bytes:
    choices = [
        lambda: str(rng.choice(HUGE + NEGATIVE)).encode(),
        lambda: b"9" * rng.choice([20, 5000, 100_000]),  # beyond int's digit limit too
        lambda: rng.choice([b"nan", b"inf", b"-inf", b"1e999", b"", b"0x10", b"1,2,3"]),
        lambda: rng.randbytes(rng.randint(1, 300)),
        lambda: b"s1.npy",
        lambda: b"a" * rng.choice([200, 70_000]),
    ]
    return rng.choice(choices)()


def pax_records(rng: random.Random) -> bytes:
    records = b"".join(pax_record(rng.choice(KEYWORDS), value(rng))
                       for _ in range(rng.randint(1, 4)))  # fmt: skip
    if rng.random() < 0.3:  # break the framing: a wrong, zero, huge or missing length
        bad = rng.choice([b"0", b"3", b"99999999999999999999", b"x", b"-5", b""])
        records = bad + records[records.index(b" ") :]
    return records


def mutation(rng: random.Random) -> tuple[str, bytes, bool]:
    """(what, the bytes that replace the second sample's first header, must it be flagged)."""
    kind = rng.choice(["size", "field", "pax", "global", "gnu", "sparse", "typeflag"])
    if kind == "size":
        claim = rng.choice(HUGE + NEGATIVE)
        return f"size {claim}", header("s1.npy", raw={124: size_field(claim)}), True
    if kind == "field":
        offset = rng.choice([0, 100, 108, 116, 124, 136, 157, 257, 263, 329, 345])
        raw = rng.choice([rng.randbytes(12), b"\xff" * 12, b"\x80" + rng.randbytes(11),
                          b"9" * 12, b" " * 12, b"\0" * 12])  # fmt: skip
        return f"field {offset}", header("s1.npy", 4, raw={offset: raw}) + b"\0" * 512, False
    if kind in ("pax", "global"):
        records = pax_records(rng)
        claim = rng.choice([None, None, 0, len(records) // 2, *HUGE, *NEGATIVE])
        typeflag = b"x" if kind == "pax" else b"g"
        hostile = claim is not None and not 0 <= claim < 2**20
        return f"{kind} claim {claim}", pax(records, typeflag, claim) + header("s1.npy"), hostile
    if kind == "gnu":
        name = rng.choice([rng.randbytes(rng.randint(1, 600)), b"s1.npy", b"../x.npy"])
        claim = rng.choice([len(name), *HUGE, *NEGATIVE])
        block = header("././@LongLink", 0, rng.choice([b"L", b"K"]), raw={124: size_field(claim)})
        return f"gnu claim {claim}", block + name + b"\0" * (-len(name) % 512), claim != len(name)
    if kind == "sparse":
        raw = {386: rng.randbytes(96), 482: rng.choice([b"\0", b"\1"]),
               483: size_field(rng.choice(HUGE + [10]))}  # fmt: skip
        ext = b"".join(rng.randbytes(504) + b"\1" + b"\0" * 7 for _ in range(rng.randint(0, 5)))
        return "sparse", header("s1.npy", 0, b"S", raw=raw) + ext, False
    typeflag = bytes([rng.randrange(256)])
    return f"typeflag {typeflag!r}", header("s1.npy", 4, typeflag) + b"\0" * 512, False


def stream(seed: int) -> tuple[str, bytes, bool]:
    rng = random.Random(seed)
    what, hostile, flagged = mutation(rng)
    data = sample("s0") + hostile + sample("s2") + END
    if rng.random() < 0.25:
        data = data[: rng.randrange(len(data))]
        flagged = flagged or len(data) > 0
    if rng.random() < 0.5:
        return what + " gzip", gzip_bytes(data), flagged
    return what, data, flagged


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    cases = {}
    for seed in range(CASES):
        what, data, flagged = stream(seed)
        path = root / f"case{seed:03d}{'.tar.gz' if what.endswith('gzip') else '.tar'}"
        path.write_bytes(data)
        cases[str(path)] = (seed, what, flagged)
    done = subprocess.run([sys.executable, "-m", "bounded_read", *cases], env=child_env(),
                          cwd=str(HELPERS), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == CASES
    return [(*cases[row.pop("shard")], row) for row in rows]


def test_every_fuzzed_header_ends_in_bounded_time_and_memory_without_a_crash(fuzzed):
    bad = [(seed, what, row) for seed, what, _, row in fuzzed
           if row["status"] != "ok" or row["crash"] or row["growth_kib"] > 64 * 1024]  # fmt: skip
    assert not bad, bad


def test_every_impossible_claim_is_recorded(fuzzed):
    silent = [(seed, what, row) for seed, what, flagged, row in fuzzed
              if flagged and row.get("status") == "ok" and not row["shard_error"]
              and not row["errors"]]  # fmt: skip
    assert not silent, silent


def test_the_fuzz_reaches_the_error_paths(fuzzed):
    # a generator that only made readable shards would test nothing
    recorded = sum(bool(row.get("shard_error") or row.get("errors")) for *_, row in fuzzed)
    assert recorded > CASES // 2
