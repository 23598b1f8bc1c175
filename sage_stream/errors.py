"""Typed errors. Each one names where the problem is (URL, shard, key) and what to do.

Errors also inherit the matching builtin (ValueError, OSError, ...) so that callers who do not
know our types still catch them sensibly. The CLI prints any `SageError` as one line, with no
traceback: these are problems with the input or the configuration, not bugs.
"""

from __future__ import annotations

import numbers
import threading


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

    def __reduce__(self):  # noqa: ANN204 - so that it crosses process boundaries (Ray) whole
        return (type(self), (self.url, self.reason, self.key))


class SampleError(SageError, ValueError):
    """One sample that cannot be used; under --on-error skip it is recorded in scores/."""

    def __init__(self, shard: str, key: str, reason: str, url: str | None = None):
        self.shard, self.key, self.reason, self.url = shard, key, reason, url
        where = f"{url} (shard {shard!r})" if url else f"shard {shard!r}"
        super().__init__(f"{where}, key {key!r}: {reason}")

    def __reduce__(self):  # noqa: ANN204 - see ShardError
        return (type(self), (self.shard, self.key, self.reason, self.url))


class StorageError(SageError, OSError):
    """Storage that still fails after the retries (a write or commit that could not be done)."""


class MismatchError(SageError, ValueError):
    """A stored sketch or output was made with another model or configuration."""


class OutputExistsError(SageError, FileExistsError):
    """The output already holds a finished run with another configuration."""


class OutputLockedError(SageError, FileExistsError):
    """Another run holds the output folder's lease (OUT/_LEASE): one writer per output."""


class LoaderError(SageError, RuntimeError):
    """A loader worker process died (out of memory, a crash in native code) mid-shard."""


def positive_int(value: object, what: str) -> int:
    """``value`` as an int if it is an integer ≥ 1 (not a bool), else an InputError naming
    `what`: the one check of the library functions' count and size arguments."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (cli.sigterm_stops_cleanly), so that it unwinds
    exactly as Ctrl-C does."""


SIGTERM_RECEIVED = threading.Event()  # set with Terminated: Ray's blocking calls re-raise it
# as a plain KeyboardInterrupt, so the type alone cannot tell


def stopped_by_sigterm(exc: KeyboardInterrupt) -> bool:
    """Whether this interrupt is a SIGTERM (cli's exit code, stopped.json), not a Ctrl-C."""
    return isinstance(exc, Terminated) or SIGTERM_RECEIVED.is_set()
