"""The selection's rules (sage_stream.select.rules): one check, the same at every entry."""

from __future__ import annotations

import pytest

import sage_stream
from sage_stream import api
from sage_stream.config import Config
from sage_stream.errors import InputError
from sage_stream.select.rules import Rules


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "say how much to keep"),
        ({"keep": 0.3, "min_score": 0.1}, "not both"),
        ({"keep": 0.0}, r"--keep must be in \(0, 1\]"),
        ({"keep": 1.5}, r"--keep must be in \(0, 1\]"),
        ({"min_score": float("nan")}, "--min-score must be a finite number"),
        ({"min_score": float("inf")}, "--min-score must be a finite number"),
        ({"keep": 0.3, "scorer": "best"}, "--scorer 'best': choose one of"),
        ({"keep": 0.3, "balance": "fair"}, "--balance 'fair': choose one of"),
    ],
)
def test_a_bad_request_is_refused_with_one_message(options, message):
    with pytest.raises(InputError, match=message):
        Rules(**options)
    if options:  # Config checks the same rule (it may leave both out: not every step selects)
        with pytest.raises(InputError, match=message):
            Config(**options)


def test_a_bool_is_not_a_fraction():
    with pytest.raises(InputError, match=r"--keep must be in \(0, 1\], got True"):
        Rules(keep=True)


def test_with_a_threshold_sage_coverage_ranks_by_agreement():
    assert Rules(min_score=0.2, scorer="sage-coverage").ranked_by == "sage"
    assert Rules(keep=0.2, scorer="sage-coverage").ranked_by == "sage-coverage"
    assert Rules(keep=0.2).params() == {
        "keep": 0.2, "balance": "proportional", "min_score": None, "scorer": "sage", "seed": 0
    }  # fmt: skip


def test_the_public_select_is_the_step_and_the_package_is_reached_by_module_name():
    # `sage_stream.select` stays the public function; the package's modules import by name.
    from sage_stream.select.reference import select as reference_select

    assert sage_stream.select is api.select
    assert callable(reference_select) and reference_select is not api.select
