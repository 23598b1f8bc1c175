"""Shared fixtures. Shard-making helpers live in ``shardmaker.py`` (import them directly)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fsspec
import pytest


@pytest.fixture
def mem_url() -> Iterator[str]:
    """A fresh ``memory://`` folder for one test, removed afterwards (the store is global)."""
    root = f"memory://test-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)
