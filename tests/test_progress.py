"""Progress: a total, a percentage and an ETA, exact when known, else from the shards done."""

from __future__ import annotations

import logging

from sage_stream import progress as progress_module
from sage_stream.progress import Progress


def test_log_lines_carry_an_estimated_total_and_eta(caplog, monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="sage_stream")
    p = Progress("pass 1 (sketch)", total_shards=4, enabled=False)
    assert p.expected is None and p.eta() is None
    p.advance(100)
    p.shard_done("a.tar")
    assert p.expected == 400
    line = caplog.records[-1].getMessage()
    assert "1/4 shards, 100 samples of ~400 (25%)" in line and "ETA" in line


def test_an_exact_total_is_used_as_is(monkeypatch):
    p = Progress("pass 2 (score)", total_shards=2, enabled=False, total_samples=1000)
    p.advance(250)
    assert p.expected == 1000 and p.eta() is not None and p.eta() > 0


def test_the_bar_gets_the_estimated_total():
    p = Progress("emit", total_shards=3, enabled=True)
    p.advance(10)
    p.shard_done("a")
    assert p._bar is not None and p._bar.total == 30
    p.close()
