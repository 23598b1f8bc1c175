"""Retries for transient storage errors: the safety net under every read and write of the flow.

A nightly job over 10,000 shards in object storage meets connection resets, timeouts, 5xx
answers and throttling (``SlowDown``) as a matter of course; none of them says anything about
the data, so none of them may fail a run or, worse, pass silently as a truncated shard. s3fs
and botocore retry single requests; this module retries the operations above them, where a
whole object is opened, listed, streamed or committed:

- ``call`` runs one operation (an ``info``, a listing, a commit, a move) and retries it on a
  transient error, with exponential backoff and jitter, a bounded number of times;
- ``RetryingReader`` is a read-only file that survives a reset part-way through a stream: it
  reopens the object, seeks back to where the last good read ended and reads on, so a
  streaming tar read continues byte-exactly (and refuses to continue if the object changed).

Anything else (a missing object, access denied, a bad argument) is not transient and is raised
at once. The policy comes from the environment, so operators can tune it without a code
change: ``SAGE_STREAM_RETRY_ATTEMPTS`` (total tries, default 5) and
``SAGE_STREAM_RETRY_DELAY`` (seconds before the second try, default 0.2; doubles per try,
capped at 10 s, each delay drawn in [d/2, d] from a seeded or OS-seeded generator, never from
the clock).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from ..errors import InputError

log = logging.getLogger("sage_stream")
T = TypeVar("T")

_TRANSIENT_ERRNOS = frozenset(
    code
    for code in (
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EAGAIN,
        errno.EBUSY,  # s3fs: SlowDown, ServiceUnavailable, 503
        getattr(errno, "EREMOTEIO", None),  # s3fs: InternalError, 500
    )
    if code is not None
)
# (top-level package, class name) anywhere in the exception's MRO; no optional imports needed
_TRANSIENT_TYPES = frozenset(
    {
        ("aiohttp", "ClientPayloadError"),  # body cut short: reset mid-response
        ("aiohttp", "ServerDisconnectedError"),
        ("aiohttp", "ServerTimeoutError"),
        ("botocore", "ConnectionClosedError"),
        ("botocore", "ReadTimeoutError"),
        ("botocore", "ConnectTimeoutError"),
        ("botocore", "ResponseStreamingError"),
        ("botocore", "IncompleteReadError"),
        ("botocore", "ResponseParserError"),  # throttling answers are sometimes not XML
        ("http", "IncompleteRead"),
        ("urllib3", "ProtocolError"),
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    }
)
_NEVER_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a storage hiccup worth retrying."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        if _transient_here(current):
            return True
        if isinstance(current, _NEVER_TRANSIENT):
            return False
        current, seen = _wrapped(current), seen + 1
    return False


def _wrapped(exc: BaseException) -> BaseException | None:
    """The error inside: s3fs keeps botocore's as ``__cause__``, botocore aiohttp's in kwargs."""
    kwargs = getattr(exc, "kwargs", None)
    inner = kwargs.get("error") if isinstance(kwargs, dict) else None
    return inner if isinstance(inner, BaseException) else exc.__cause__


def _transient_here(exc: BaseException) -> bool:
    if isinstance(exc, (*_NEVER_TRANSIENT, ConnectionRefusedError)):
        return False  # a wrong endpoint should fail fast, not after a minute of backoff
    # aiobotocore reports both "refused" and "reset before the answer" as this: ask inside
    if type(exc).__name__ == "EndpointConnectionError":
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    names = {(c.__module__.split(".")[0], c.__name__) for c in type(exc).__mro__}
    if names & _TRANSIENT_TYPES:
        return True
    return _transient_status(exc)


def _transient_status(exc: BaseException) -> bool:
    """botocore ClientError (and gcsfs HttpError): throttling codes, 429 and 5xx answers."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _TRANSIENT_CODES or _retryable_status(status) or _retryable_status(code)
    if type(exc).__name__ == "HttpError":
        return _retryable_status(getattr(exc, "code", None))
    return False


def _retryable_status(status: object) -> bool:
    try:
        value = int(status)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
    return value == 429 or 500 <= value <= 599


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry: ``attempts`` tries in all, delays doubling."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    seed: int | None = None  # None: seeded from the OS; tests pass a number
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InputError(f"retry attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise InputError("retry delays must not be negative")

    def delays(self) -> Iterator[float]:
        """The ``attempts - 1`` waits: ``min(max, base·2^i)``, each scaled by U[0.5, 1)."""
        rng = random.Random(self.seed)
        for i in range(self.attempts - 1):
            yield min(self.max_delay, self.base_delay * 2**i) * (0.5 + 0.5 * rng.random())


def default_policy() -> RetryPolicy:
    """The policy from ``SAGE_STREAM_RETRY_ATTEMPTS`` / ``SAGE_STREAM_RETRY_DELAY``."""
    attempts = os.environ.get("SAGE_STREAM_RETRY_ATTEMPTS", "5")
    delay = os.environ.get("SAGE_STREAM_RETRY_DELAY", "0.2")
    try:
        count, seconds = int(attempts), float(delay)
    except ValueError:
        raise InputError(
            f"SAGE_STREAM_RETRY_ATTEMPTS={attempts!r} / SAGE_STREAM_RETRY_DELAY={delay!r}: "
            "expected an integer and a number of seconds"
        ) from None
    return RetryPolicy(attempts=count, base_delay=seconds)


def error_text(exc: BaseException) -> str:
    """One line for an error message: type, text, and how many tries were made."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    notes = [n for n in getattr(exc, "__notes__", ()) if n.startswith("gave up")]
    return f"{text} ({notes[-1]})" if notes else text


def _give_up(exc: BaseException, tries: int) -> None:
    if is_transient(exc) and not any(
        n.startswith("gave up") for n in getattr(exc, "__notes__", ())
    ):
        exc.add_note(f"gave up after {tries} {'try' if tries == 1 else 'tries'}")


def call(
    fn: Callable[..., T], *args: Any, what: str, policy: RetryPolicy | None = None, **kw: Any
) -> T:
    """``fn(*args, **kw)``, retried on transient errors; ``what`` names it in log lines."""
    policy = policy or default_policy()
    waits = policy.delays()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn(*args, **kw)
        except Exception as exc:
            if not is_transient(exc) or attempt == policy.attempts:
                _give_up(exc, attempt)
                raise
            _wait(policy, next(waits), what, exc, attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def _wait(policy: RetryPolicy, delay: float, what: str, exc: BaseException, attempt: int) -> None:
    log.warning(
        "transient storage error on %s (try %d of %d): %s; retrying in %.2f s",
        what,
        attempt,
        policy.attempts,
        error_text(exc),
        delay,
    )
    policy.sleep(delay)


def _version(f: Any) -> tuple[object, object]:
    """What identifies the object's contents: size and, where the store gives one, ETag."""
    details = getattr(f, "details", None)
    etag = details.get("ETag") if isinstance(details, dict) else None
    return getattr(f, "size", None), etag


class RetryingReader(io.RawIOBase):
    """A read-only, seekable file over ``opener()`` that survives transient errors.

    It keeps its own position; when a read or seek fails transiently it closes the file,
    opens the object again (itself retried), seeks to that position and repeats the call.
    Whatever the caller got before the failure stays valid, so a tar stream or a Parquet
    reader never sees the hiccup. If the reopened object has another size or ETag, it
    raises ``OSError(ESTALE)`` instead of splicing two versions together.
    """

    def __init__(
        self, opener: Callable[[], BinaryIO], what: str, policy: RetryPolicy | None = None
    ):
        super().__init__()
        self._opener, self._what = opener, what
        self._policy = policy or default_policy()
        self._file: BinaryIO = call(opener, what=f"open {what}", policy=self._policy)
        self._version = _version(self._file)
        self._pos = 0
        self.reopened = 0  # how many times the stream was resumed (for tests and logs)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        n = -1 if size is None else size
        data = self._retrying("read", lambda f: f.read(n))
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset, whence = self._pos + offset, io.SEEK_SET
        self._pos = self._retrying("seek", lambda f: f.seek(offset, whence))
        return self._pos

    def close(self) -> None:
        if not self.closed:
            try:
                if getattr(self, "_file", None) is not None:  # None if the first open failed
                    self._file.close()
            finally:
                super().close()

    def _retrying(self, op: str, fn: Callable[[BinaryIO], T]) -> T:
        waits = self._policy.delays()
        broken = False
        for attempt in range(1, self._policy.attempts + 1):
            try:
                if broken:
                    self._reopen()  # a failure here is one more failed try
                return fn(self._file)
            except Exception as exc:
                if not is_transient(exc) or attempt == self._policy.attempts:
                    _give_up(exc, attempt)
                    raise
                where = f"{op} of {self._what} at byte {self._pos}"
                _wait(self._policy, next(waits), where, exc, attempt)
                broken = True
        raise AssertionError("unreachable")

    def _reopen(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - the old handle is broken; closing is a courtesy
            log.debug("closing a broken handle of %s failed", self._what, exc_info=True)
        self._file = self._opener()
        if _version(self._file) != self._version:
            raise OSError(
                errno.ESTALE,
                f"{self._what} changed while it was being read (size/ETag "
                f"{self._version} -> {_version(self._file)}); re-run on a stable copy",
            )
        self._file.seek(self._pos)
        self.reopened += 1
