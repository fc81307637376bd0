"""Loopback HTTP plumbing shared by the Check365 simulator and the webhook receiver.

Both are test and demo servers: threaded, quiet, on 127.0.0.1 by default, quick to
stop so that test teardown stays fast.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

import orjson

# A drawn latency never exceeds this: a tail, not a hang (faults are scripted separately).
MAX_LATENCY_S = 60.0


@dataclass(frozen=True)
class Latency:
    """How long a local server takes to answer, as a server across the internet would.

    Fixed (``tail`` 0), or log-normal around ``median_s`` with ``tail`` as the spread of
    its logarithm: with a tail of 0.5, one answer in a hundred takes over 3.2 times the
    median. Written ``0.25`` or ``0.25~0.5`` on a command line.
    """

    median_s: float = 0.0
    tail: float = 0.0

    def __post_init__(self) -> None:
        for name in ("median_s", "tail"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.median_s > MAX_LATENCY_S:
            raise ValueError(f"median_s must be at most {MAX_LATENCY_S:g} s, got {self.median_s}")

    @classmethod
    def parse(cls, text: str) -> Latency:
        median, tilde, tail = text.partition("~")
        try:
            return cls(float(median), float(tail) if tilde else 0.0)
        except ValueError as exc:
            shape = "a latency is SECONDS or SECONDS~TAIL (for example 0.25~0.5)"
            raise ValueError(f"{shape}, got {text!r}: {exc}") from None

    def draw(self, rng: random.Random) -> float:
        if self.median_s == 0:
            return 0.0
        if self.tail == 0:
            return self.median_s
        return min(self.median_s * math.exp(rng.gauss(0.0, self.tail)), MAX_LATENCY_S)

    def wait(self, rng: random.Random) -> None:
        seconds = self.draw(rng)
        if seconds:
            time.sleep(seconds)

    def describe(self) -> str:
        return f"{self.median_s * 1000:g} ms" + (f" (log-normal, tail {self.tail:g})" if self.tail else "")


NO_LATENCY = Latency()


class QuietHandler(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 handler that logs nothing per request."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm on, the
    # client's delayed ACK would add about 40 ms to every keep-alive answer.
    disable_nagle_algorithm = True
    # Idle keep-alive connections give their thread back after this long.
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        return

    def send_body(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        # 1xx, 204 and 304 answers carry no body by definition; sending one would
        # corrupt the next response on a keep-alive connection.
        bodyless = status < 200 or status in (204, 304)
        self.send_response(status)
        if not bodyless:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not bodyless:
            self.wfile.write(body)

    def send_json(self, status: int, payload: object, headers: Mapping[str, str] | None = None) -> None:
        self.send_body(status, orjson.dumps(payload), headers)

    def read_body(self, limit: int) -> bytes | None:
        """The request body, or None (after answering 413) when it exceeds ``limit``."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self.close_connection = True
            self.send_json(413, {"success": False, "message": "Body too large"})
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self, limit: int) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(1024)
            length = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if length == 0:
                # Trailer section: header lines until the blank one.
                while self.rfile.readline(1024).strip():
                    pass
                return b"".join(chunks)
            size += length
            if size > limit:
                self.close_connection = True
                self.send_json(413, {"success": False, "message": "Body too large"})
                return None
            chunks.append(self.rfile.read(length))
            self.rfile.readline(8)  # the CRLF after each chunk


class LocalHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server whose open connections can all be cut at shutdown."""

    daemon_threads = True
    block_on_close = False
    # The default backlog of 5 resets connections when a worker pool polls in bursts.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: Callable[..., BaseHTTPRequestHandler]) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        sock = request if isinstance(request, socket.socket) else request[1]
        with self._connections_lock:
            self._connections.add(sock)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(sock)

    def close_connections(self) -> None:
        # Without this, a client's pooled keep-alive connection would still be
        # answered by its handler thread after the server "stopped".
        with self._connections_lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-answer is routine for a test server, not a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class ServerThread:
    """Serves a handler on a loopback port from a daemon thread."""

    def __init__(self, handler: Callable[..., BaseHTTPRequestHandler], host: str, port: int) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._server: LocalHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self, name: str) -> None:
        if self._server is not None:
            raise RuntimeError("the server is already started")
        self._server = LocalHTTPServer((self._host, self._port), self._handler)
        # A short poll interval makes stop() quick, which keeps test teardown fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name=name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join()


class LocalServer:
    """Start, stop and context-manager plumbing for a server run by a ``ServerThread``."""

    _server: ServerThread
    _thread_name = "local-server"

    def start(self) -> Self:
        self._server.start(self._thread_name)
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL (for the simulator, the CHECK365_BASE_URL to use)."""
        return self._server.url
