"""Retries for transient storage errors: what counts as transient, the backoff, the resumable
reader, and the storage calls of ``urls`` and the shard readers under injected resets.

Faults here come from a memory filesystem that fails each operation once (fast and exact);
tests/test_s3.py injects real HTTP faults between s3fs and an S3 server.
"""

from __future__ import annotations

import errno
import io
import logging

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from shardmaker import digit_samples, make_parquet_shard, make_tar_shard, write_bytes

from sage_stream.errors import InputError
from sage_stream.formats import read_parquet, read_tar
from sage_stream.inputs import expand_inputs
from sage_stream.sample import ShardRef
from sage_stream.storage import atomic_write, exists, retry
from sage_stream.storage.retry import RetryingReader, RetryPolicy, call, error_text, is_transient

botocore_exc = pytest.importorskip("botocore.exceptions")
aiohttp = pytest.importorskip("aiohttp")
s3fs_errors = pytest.importorskip("s3fs.errors")


def client_error(code: str, status: int) -> Exception:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return botocore_exc.ClientError(response, "GetObject")


def caused(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


TRANSIENT = [
    ConnectionResetError(errno.ECONNRESET, "reset by peer"),
    ConnectionAbortedError(),
    BrokenPipeError(),
    TimeoutError("read timed out"),
    OSError(errno.EBUSY, "Please reduce your request rate."),  # s3fs's SlowDown
    client_error("SlowDown", 503),
    client_error("InternalError", 500),
    client_error("TooManyRequests", 429),
    client_error("BadGateway", 502),
    s3fs_errors.translate_boto_error(client_error("GatewayTimeout", 504)),  # OSError(EIO) + cause
    botocore_exc.ConnectionClosedError(endpoint_url="http://s3"),
    botocore_exc.ReadTimeoutError(endpoint_url="http://s3"),
    botocore_exc.EndpointConnectionError(
        endpoint_url="http://s3", error=aiohttp.ServerDisconnectedError()
    ),
    aiohttp.ClientPayloadError("Response payload is not completed"),
    aiohttp.ServerDisconnectedError(),
    caused(OSError(errno.EIO, "read failed"), ConnectionResetError()),
]
PERMANENT = [
    FileNotFoundError("bucket/key"),
    PermissionError("Forbidden"),
    ConnectionRefusedError(),  # a wrong endpoint: fail fast
    botocore_exc.EndpointConnectionError(endpoint_url="http://s3", error=ConnectionRefusedError()),
    client_error("NoSuchKey", 404),
    client_error("AccessDenied", 403),
    OSError(errno.EIO, "input/output error"),
    ValueError("bad argument"),
    caused(FileNotFoundError("gone"), ConnectionResetError()),  # the outer verdict wins
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_errors_are_recognised(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: type(e).__name__)
def test_other_errors_are_not_retried(exc):
    assert not is_transient(exc)


def test_delays_double_up_to_the_cap_with_seeded_jitter():
    policy = RetryPolicy(attempts=8, base_delay=1.0, max_delay=10.0, seed=7)
    delays = list(policy.delays())
    assert len(delays) == 7
    for i, d in enumerate(delays):
        ceiling = min(10.0, 2.0**i)
        assert ceiling / 2 <= d <= ceiling
    assert delays == list(RetryPolicy(attempts=8, base_delay=1.0, max_delay=10.0, seed=7).delays())
    assert delays != list(RetryPolicy(attempts=8, base_delay=1.0, max_delay=10.0, seed=8).delays())


class Flaky:
    """A callable that raises ``errors`` in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def quick(attempts: int = 3) -> tuple[RetryPolicy, list[float]]:
    slept: list[float] = []
    return RetryPolicy(attempts=attempts, base_delay=0.5, seed=0, sleep=slept.append), slept


def test_call_retries_transient_errors_then_succeeds(caplog):
    policy, slept = quick()
    fn = Flaky(ConnectionResetError(), client_error("SlowDown", 503))
    with caplog.at_level(logging.WARNING, "sage_stream"):
        assert call(fn, what="info s3://b/k", policy=policy) == "ok"
    assert fn.calls == 3 and len(slept) == 2 and slept == list(policy.delays())
    assert "info s3://b/k (try 1 of 3)" in caplog.text


def test_call_gives_up_after_the_last_try_and_says_so():
    policy, slept = quick(attempts=3)
    fn = Flaky(*(TimeoutError("timed out") for _ in range(5)))
    with pytest.raises(TimeoutError) as info:
        call(fn, what="ls", policy=policy)
    assert fn.calls == 3 and len(slept) == 2
    assert error_text(info.value) == "TimeoutError: timed out (gave up after 3 tries)"


def test_call_raises_permanent_errors_at_once():
    policy, slept = quick()
    fn = Flaky(PermissionError("Forbidden"))
    with pytest.raises(PermissionError):
        call(fn, what="open", policy=policy)
    assert fn.calls == 1 and slept == []


def test_policy_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAGE_STREAM_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("SAGE_STREAM_RETRY_DELAY", "0")
    assert retry.default_policy() == RetryPolicy(attempts=2, base_delay=0.0)
    monkeypatch.setenv("SAGE_STREAM_RETRY_ATTEMPTS", "many")
    with pytest.raises(InputError, match="SAGE_STREAM_RETRY_ATTEMPTS"):
        retry.default_policy()
    monkeypatch.setenv("SAGE_STREAM_RETRY_ATTEMPTS", "0")
    with pytest.raises(InputError, match="at least 1"):
        retry.default_policy()


# --- the resumable reader ----------------------------------------------------------------


class BreakingFile(io.BytesIO):
    """Object bytes whose read fails once when it crosses each offset in ``breaks``."""

    def __init__(self, data: bytes, breaks: set[int]):
        super().__init__(data)
        self.size, self.breaks = len(data), breaks

    def read(self, n: int | None = -1) -> bytes:
        start = self.tell()
        end = self.size if n is None or n < 0 else min(self.size, start + n)
        hit = next((b for b in sorted(self.breaks) if start <= b < end), None)
        if hit is not None:
            self.breaks.discard(hit)
            super().read(hit - start)  # the connection dies part-way: position is garbage now
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return super().read(n)


def test_reader_resumes_at_the_right_byte_after_resets():
    data = bytes(range(256)) * 40
    breaks = {5, 1000, 1001, 7777}
    opened = []

    def opener() -> BreakingFile:
        opened.append(1)
        return BreakingFile(data, breaks)

    policy, slept = quick(attempts=3)
    reader = RetryingReader(opener, "mem://obj", policy)
    chunks = []
    while chunk := reader.read(333):
        chunks.append(chunk)
    assert b"".join(chunks) == data and reader.tell() == len(data)
    assert reader.reopened == 4 == len(opened) - 1 and len(slept) == 4
    assert reader.seek(-10, io.SEEK_END) == len(data) - 10 and reader.read() == data[-10:]
    assert reader.seek(100) == 100 and reader.read(4) == data[100:104]


def test_reader_refuses_to_splice_a_changed_object():
    versions = [BreakingFile(b"a" * 100, {50}), BreakingFile(b"b" * 120, set())]
    reader = RetryingReader(lambda: versions.pop(0), "mem://obj", quick()[0])
    with pytest.raises(OSError, match="changed while it was being read") as info:
        reader.read()
    assert info.value.errno == errno.ESTALE


# --- urls and the readers under injected faults ------------------------------------------


class FlakyMemoryFS(MemoryFileSystem):
    """memory://, except that every (operation, path) fails once with a connection reset and
    every file opened for reading breaks once half-way through."""

    protocol = ("flakymem",)
    failed: set[tuple[str, str]] = set()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(str(path).replace("flakymem://", "memory://", 1))

    def _once(self, op: str, path: str) -> None:
        if (op, path) not in self.failed:
            self.failed.add((op, path))
            raise ConnectionResetError(errno.ECONNRESET, f"injected reset: {op} {path}")

    def info(self, path, **kw):  # noqa: ANN001, ANN201
        self._once("info", self._strip_protocol(path))
        return super().info(path, **kw)

    def ls(self, path, detail=True, **kw):  # noqa: ANN001, ANN201
        self._once("ls", self._strip_protocol(path))
        return super().ls(path, detail=detail, **kw)

    def mv(self, path1, path2, **kw):  # noqa: ANN001, ANN201
        self._once("mv", self._strip_protocol(path2))
        return super().mv(path1, path2, **kw)

    def _open(self, path, mode="rb", **kw):  # noqa: ANN001, ANN202
        f = super()._open(path, mode, **kw)
        if mode != "rb":
            return f
        breaks = set() if ("read", path) in self.failed else {f.size // 2}
        self.failed.add(("read", path))
        return BreakingFile(f.getvalue(), breaks)


@pytest.fixture
def flaky(mem_url, monkeypatch):
    """(memory:// root, the same root through flakymem://), with quick retries."""
    fsspec.register_implementation("flakymem", FlakyMemoryFS, clobber=True)
    FlakyMemoryFS.failed = set()
    monkeypatch.setenv("SAGE_STREAM_RETRY_DELAY", "0.001")
    return mem_url, mem_url.replace("memory://", "flakymem://")


def test_tar_and_parquet_readers_survive_resets(flaky, caplog):
    mem, flakymem = flaky
    make_tar_shard(f"{mem}/a.tar", digit_samples(20))
    columns = {"__key__": [f"k{i}" for i in range(40)], "v": list(range(40))}
    make_parquet_shard(f"{mem}/b.parquet", columns, row_group_size=5)
    for name, reader in (("a.tar", read_tar), ("b.parquet", read_parquet)):
        fmt = "tar" if name.endswith(".tar") else "parquet"
        want = [(s.key, s.fields) for s in reader(ShardRef(f"{mem}/{name}", name, fmt))]
        with caplog.at_level(logging.WARNING, "sage_stream"):
            got = [(s.key, s.fields) for s in reader(ShardRef(f"{flakymem}/{name}", name, fmt))]
        assert got == want and len(got) in (20, 40)
        assert f"read of {flakymem}/{name} at byte" in caplog.text  # it did break, and resume


def test_listing_exists_and_moves_are_retried(flaky):
    mem, flakymem = flaky
    for i in range(3):
        write_bytes(f"{mem}/in/s-{i}.tar", b"x")
    refs = expand_inputs([f"{flakymem}/in"])  # info, then ls of the folder: both fail once
    assert [r.name for r in refs] == ["s-0.tar", "s-1.tar", "s-2.tar"]
    assert exists(f"{flakymem}/in/s-1.tar") and not exists(f"{flakymem}/in/nope.tar")
    with atomic_write(f"{flakymem}/out/a.json") as f:  # the move into place fails once
        f.write(b"{}")
    assert fsspec.filesystem("memory").cat(f"{mem}/out/a.json") == b"{}"
    assert {op for op, _ in FlakyMemoryFS.failed} >= {"info", "ls", "mv"}
