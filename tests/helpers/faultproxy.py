"""An HTTP proxy in front of the test S3 server that injects the faults object storage really
produces: connection resets part-way through a body or before any answer, 503 SlowDown, 500,
403. conftest.py's ``s3_proxy`` fixture runs one per test; its ``plan`` decides, per request,
which fault to inject.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


@contextlib.contextmanager
def fault_proxy(endpoint: str) -> Iterator[FaultProxy]:
    """A proxy to the S3 server at `endpoint` (http://host:port), for the block."""
    host, port = endpoint.removeprefix("http://").split(":")
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
