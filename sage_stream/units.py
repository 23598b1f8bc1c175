"""Byte sizes as people write them: `--max-member-bytes 1GiB`, `max-sample-bytes = "512 MiB"`.

Where it sits: at the edge, when options are read (config.py coerces the byte-size fields
with `byte_size`, whatever their source: a flag, a TOML file or the API). One function, so
that every place an option is defined can name it as the option's parser.
"""

from __future__ import annotations

import math
import re

from .errors import InputError

# binary (KiB = 1024) and decimal (kB = 1000) units; a bare number is bytes
UNITS = {
    "": 1, "b": 1,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}  # fmt: skip
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")


def byte_size(value: object, option: str = "size") -> int:
    """A number of bytes from an int, or a string with an optional unit: `268435456`,
    `256MiB`, `256 MiB`, `1.5GiB`, `2GB` (units are case-insensitive; KiB, MiB, GiB, TiB are
    powers of 1024, kB, MB, GB, TB powers of 1000). A fraction of a byte rounds down."""
    if isinstance(value, bool):
        raise InputError(f"{option} expects a size in bytes (e.g. 256MiB), got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    found = _SIZE.fullmatch(value) if isinstance(value, str) else None
    unit = found.group(2).lower() if found else None
    if found is None or unit not in UNITS:
        raise InputError(
            f"{option} expects a size in bytes, optionally with a unit (268435456, 256MiB, "
            f"1GiB, 2GB), got {value!r}"
        )
    return int(float(found.group(1)) * UNITS[unit])
