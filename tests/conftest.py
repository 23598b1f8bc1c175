"""Shared fixtures. Helpers live in ``helpers/`` (on sys.path: ``from tiny import mlp``):
``shardmaker`` makes shards, ``tiny`` tiny data sets and models, ``killer`` decoders that
count or kill, ``paths`` where things are.

Object storage is tested against a real S3-protocol server on loopback, as s3fs tests itself:
``s3`` starts moto's ThreadedMotoServer once per session and points the standard AWS
environment at it; ``s3_bucket`` gives each test an empty bucket and resets the server after.
``s3_proxy`` puts an HTTP proxy between client and server that can inject the faults object
storage really produces: connection resets part-way through a body, 503 SlowDown, 500.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import struct
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SESSION_TOKEN": None,  # removed: a real token in the environment must not leak in
    "AWS_PROFILE": None,
}


@pytest.fixture
def mem_url() -> Iterator[str]:
    """A fresh ``memory://`` folder for one test, removed afterwards (the store is global)."""
    root = f"memory://test-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto on 127.0.0.1 (a free port), with AWS_* set for the session and restored after."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {name: os.environ.get(name) for name in env}
    _set_env(env)
    try:
        yield S3Server(env["AWS_ENDPOINT_URL"])
    finally:
        _set_env(saved)
        server.stop()


def _set_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def s3_bucket(s3: S3Server) -> Iterator[str]:
    """``s3://<fresh bucket>`` for one test; the server is reset and s3fs caches cleared after."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(name)
    yield f"s3://{name}"
    s3.reset()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_deny_get() -> Callable[[str, str], None]:
    """``deny(bucket_url, key)``: a bucket policy that makes one object unreadable (moto
    enforces it: GET answers 403, HEAD and listing still work, as with a missing grant)."""
    import boto3
    import s3fs

    def deny(bucket: str, key: str) -> None:
        name = bucket.removeprefix("s3://")
        statement = {
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{name}/{key}",
        }
        policy = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
        boto3.client("s3").put_bucket_policy(Bucket=name, Policy=policy)
        s3fs.S3FileSystem.clear_instance_cache()

    return deny


# --- fault injection ---------------------------------------------------------------------

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "forbidden": (403, "AccessDenied", "Access Denied"),
}
Plan = Callable[[str, str], str | None]  # (method, path?query) -> fault name or None


@dataclass
class FaultProxy:
    """What the proxy did: every request seen and every fault injected, in order."""

    endpoint: str
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, range
    faults: list[tuple[str, str, str]] = field(default_factory=list)  # fault, method, path
    plan: Plan = lambda method, path: None  # noqa: E731

    def injected(self, kind: str) -> int:
        return sum(1 for fault, _, _ in self.faults if fault == kind)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    proxy: FaultProxy
    upstream: tuple[str, int]
    lock: threading.Lock

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        with self.lock:
            self.proxy.requests.append((self.command, self.path, self.headers.get("Range")))
            fault = self.proxy.plan(self.command, self.path)
            if fault:
                self.proxy.faults.append((fault, self.command, self.path))
        if fault in _ERRORS:
            return self._error(*_ERRORS[fault])
        if fault == "reset-early" or (fault == "reset" and self.command == "HEAD"):
            return self._reset()
        status, headers, data = self._forward(body)
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        length = dict((k.lower(), v) for k, v in headers).get("content-length", str(len(data)))
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if fault == "reset" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])  # half the body, then a TCP reset
            self.wfile.flush()
            return self._reset()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

    def _forward(self, body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
        # one upstream connection per client connection (this handler), kept alive
        if getattr(self, "_conn", None) is None:
            self._conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            self._conn.request(self.command, self.path, body=body, headers=headers)
            response = self._conn.getresponse()
            return response.status, response.getheaders(), response.read()
        except Exception:
            self._conn.close()
            self._conn = None
            raise

    def finish(self) -> None:
        if getattr(self, "_conn", None) is not None:
            self._conn.close()
        super().finish()

    def _error(self, status: int, code: str, message: str) -> None:
        xml = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _reset(self) -> None:
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a reset socket makes the handler's final flush fail; that is the point


@pytest.fixture
def s3_proxy(s3: S3Server) -> Iterator[FaultProxy]:
    """A proxy to the S3 server whose ``plan`` decides, per request, which fault to inject.

    Faults: "reset" (half the body, then a TCP reset), "reset-early" (reset before any
    answer), "slowdown" (503 SlowDown), "internal" (500 InternalError), "forbidden" (403
    AccessDenied: a bucket these credentials may not read).
    """
    host, port = s3.endpoint.removeprefix("http://").split(":")
    server = _Server(("127.0.0.1", 0), _Handler)
    proxy = FaultProxy(f"http://127.0.0.1:{server.server_address[1]}")
    _Handler.proxy, _Handler.upstream, _Handler.lock = proxy, (host, int(port)), threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
