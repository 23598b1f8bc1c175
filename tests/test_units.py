"""Byte sizes with units (issue 26.5): `--max-member-bytes 1GiB` as the help writes sizes."""

from __future__ import annotations

import pytest

from sage_stream.cli import build_parser, gather_options
from sage_stream.config import make_config
from sage_stream.errors import InputError
from sage_stream.units import byte_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("268435456", 268435456), ("256MiB", 256 * 2**20), ("256 MiB", 256 * 2**20),
     ("1GiB", 2**30), ("1gib", 2**30), ("1.5GiB", 3 * 2**29), ("2GB", 2 * 10**9),
     ("64kB", 64_000), ("512KiB", 2**19), ("7B", 7), (4096, 4096)],
)  # fmt: skip
def test_sizes_with_and_without_units(text, expected):
    assert byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "1 GiBs", "-1MiB", "1e3", "one", True, None])
def test_bad_sizes_name_the_option(text):
    with pytest.raises(InputError, match="--max-member-bytes expects a size"):
        byte_size(text, "--max-member-bytes")


def test_the_cli_toml_and_api_take_units_and_record_bytes():
    args = build_parser().parse_args(
        ["run", "a.tar", "--out", "o", "--max-member-bytes", "1GiB", "--max-sample-bytes", "2GiB"]
    )
    cfg = make_config(**gather_options(args))
    assert (cfg.max_member_bytes, cfg.max_sample_bytes) == (2**30, 2**31)
    assert make_config(max_member_bytes="256 MiB") == make_config()  # the default, spelled out
    with pytest.raises(InputError, match="--max-sample-bytes"):
        make_config(max_sample_bytes="lots")
