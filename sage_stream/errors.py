"""Typed errors. Each one names where the problem is (URL, shard, key) and what to do.

Errors also inherit the matching builtin (ValueError, OSError, ...) so that callers who do not
know our types still catch them sensibly. The CLI prints any `SageError` as one line, with no
traceback: these are problems with the input or the configuration, not bugs.
"""

from __future__ import annotations


class SageError(Exception):
    """Base of every expected error: printed as one line by the CLI."""


class InputError(SageError, ValueError):
    """A bad argument, option or configuration value."""


class ShardError(SageError, OSError):
    """A shard that cannot be read at all, or whose stream breaks part-way."""

    def __init__(self, url: str, reason: str, key: str | None = None):
        self.url, self.reason, self.key = url, reason, key
        where = f"{url} (after key {key!r})" if key else url
        super().__init__(f"{where}: {reason}")


class SampleError(SageError, ValueError):
    """One sample that cannot be used; under --on-error skip it is recorded in scores/."""

    def __init__(self, shard: str, key: str, reason: str):
        self.shard, self.key, self.reason = shard, key, reason
        super().__init__(f"shard {shard!r}, key {key!r}: {reason}")


class MismatchError(SageError, ValueError):
    """A stored sketch or output was made with another model or configuration."""


class OutputExistsError(SageError, FileExistsError):
    """The output already holds a finished run with another configuration."""
