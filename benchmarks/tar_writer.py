"""Emit's tar writer against a plain write of the same bytes, by member size.

`formats.tar.TarShardWriter.write_member` is how emit writes every kept member of a tar shard.
Each row writes members of one size to an in-memory shard and, as the baseline in the same run,
the same bytes with one `BytesIO.write` per member; the figure is CPU ms a member and the
writer's time over the baseline's. tarfile's stream object cuts its buffer one 10 KB record at a
time, so a member handed over in one write cost its size squared (docs/benchmarks.md §8, s9).

    python benchmarks/tar_writer.py            # members of 10 KB to 64 MB (about a minute)
    python benchmarks/tar_writer.py --quick    # up to 1 MB: a smoke run
"""

from __future__ import annotations

import io
import random
import time

from common import cpu_parser, write_results

from sage_stream.formats.tar import TarShardWriter

SIZES = [10_000, 100_000, 1_000_000, 8_000_000, 64_000_000]


def timed(write, members: int) -> float:
    """CPU seconds a member of `write(i)` over `members` calls."""
    start = time.process_time()
    for i in range(members):
        write(i)
    return (time.process_time() - start) / members


def row(size: int) -> dict:
    data = random.Random(size).randbytes(size)
    members = max(2, min(200, 64_000_000 // size))
    plain, shard = io.BytesIO(), io.BytesIO()
    base = timed(lambda i: plain.write(data), members)
    with TarShardWriter(shard) as writer:
        ours = timed(lambda i: writer.write_member(f"k{i}.bin", data), members)
    return {"member_bytes": size, "members": members, "writer_ms": round(ours * 1e3, 3),
            "plain_write_ms": round(base * 1e3, 3),
            "writer_over_plain": round(ours / base, 2) if base > 0 else None}  # fmt: skip


def main() -> None:
    args = cpu_parser(__doc__.splitlines()[0]).parse_args()
    rows = [row(size) for size in (SIZES[:3] if args.quick else SIZES)]
    for r in rows:
        print(r, flush=True)
    write_results(args, "tar_writer", {"rows": rows})


if __name__ == "__main__":
    main()
