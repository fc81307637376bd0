"""Deadlines the worker enforces itself: no HTTP exchange runs past its step's time.

The pool runs steps in threads, which nothing can kill, so a step bounds itself. Each
step runs under ``step_deadline`` (its task's time limit, see worker/leases.py) and each
HTTP exchange under ``exchange_deadline`` (its budget). The HTTP clients' network layer
(``DeadlineBackend``) gives every connect, TLS handshake, read and write at most the time
left before the nearest of the two, and refuses to start one once it has passed: an
answer trickled a byte at a time, headers included, ends as a timeout on time, where
httpx's own timeouts bound only each read.
"""

from __future__ import annotations

import contextvars
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx
from httpcore._backends.sync import SyncStream

# Linux's socket option and the first byte of its answer, the connection's state.
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
_TCP_ESTABLISHED = 1

_step: contextvars.ContextVar[float | None] = contextvars.ContextVar("check365_step_deadline", default=None)
_exchange: contextvars.ContextVar[float | None] = contextvars.ContextVar("check365_exchange_deadline", default=None)


def current() -> float | None:
    """The nearest deadline (``time.monotonic``) of the running step and exchange, if any."""
    step, exchange = _step.get(), _exchange.get()
    if step is None:
        return exchange
    return step if exchange is None else min(step, exchange)


def remaining() -> float | None:
    deadline = current()
    return None if deadline is None else deadline - time.monotonic()


@contextmanager
def step_deadline(seconds: float) -> Iterator[float]:
    """Run a step that must be over ``seconds`` from now (a lowered limit never widens an outer one)."""
    deadline = time.monotonic() + seconds
    outer = _step.get()
    token = _step.set(deadline if outer is None else min(outer, deadline))
    try:
        yield deadline
    finally:
        _step.reset(token)


@contextmanager
def exchange_deadline(seconds: float) -> Iterator[float]:
    """Run one HTTP exchange that must be over ``seconds`` from now, or by the step's deadline if sooner."""
    deadline = time.monotonic() + seconds
    token = _exchange.set(deadline)
    try:
        yield min(deadline, _step.get() or deadline)
    finally:
        _exchange.reset(token)


def _clamp(timeout: float | None, error: type[Exception]) -> float | None:
    left = remaining()
    if left is None:
        return timeout
    if left <= 0:
        raise error("the step's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream
        self._socket = stream.get_extra_info("socket")
        # httpcore's own socket stream (plain or TLS) is read and written here, directly.
        self._sock: socket.socket | None = self._socket if type(stream) is SyncStream else None

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        timeout = _clamp(timeout, httpcore.ReadTimeout)
        sock = self._sock
        if sock is None:
            return self._stream.read(max_bytes, timeout)
        try:
            _set_timeout(sock, timeout)
            return sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.ReadError(exc) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        timeout = _clamp(timeout, httpcore.WriteTimeout)
        sock = self._sock
        if sock is None:
            self._stream.write(buffer, timeout)
            return
        try:
            _set_timeout(sock, timeout)
            while buffer:
                buffer = buffer[sock.send(buffer) :]
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.WriteError(exc) from exc

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self._stream.start_tls(ssl_context, server_hostname, _clamp(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(inner)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Asked of every idle connection of a pool each time a request starts or ends.
            closed = peer_closed(self._socket)
            if closed is not None:
                return closed
        return self._stream.get_extra_info(info)


def _set_timeout(sock: socket.socket, timeout: float | None) -> None:
    # What httpcore's stream does before every read and write, but only when the value
    # changes: ``settimeout`` sets the descriptor's blocking mode again each time, a system
    # call that gives up the interpreter lock (a hand-off to another thread) for nothing.
    if sock.gettimeout() != timeout:
        sock.settimeout(timeout)


def peer_closed(sock: Any) -> bool | None:
    """Whether the other end closed or reset an idle TCP connection, from its state in the kernel.

    httpcore asks whether an idle connection's socket is readable, which a server's close
    makes it, with a ``poll``: like every system call Python makes, that gives up the
    interpreter lock, a hand-off to another of the worker's threads for each idle
    connection checked. The socket's TCP state (``TCP_INFO``) is read without giving it up.
    What it does not see, bytes a server sent on an idle connection unasked, makes the next
    request on it fail as a protocol error (retried like any failed request), where the
    poll would have dropped the connection first. None where the state cannot be read
    (not Linux, not TCP): the caller polls as before.
    """
    if sock is None or _TCP_INFO is None:
        return None
    try:
        state: bytes = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
    except (OSError, ValueError, AttributeError):
        return None
    if not state:
        return None
    return state[0] != _TCP_ESTABLISHED


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's blocking sockets, each operation bounded by the current deadline."""

    def __init__(self, inner: httpcore.NetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host, port, _clamp(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(path, _clamp(timeout, httpcore.ConnectTimeout), socket_options)
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def bounded_transport(limits: httpx.Limits) -> httpx.HTTPTransport:
    """httpx's default transport, its sockets bounded by the current deadline.

    httpx takes no network backend, so the one of its connection pool is replaced;
    tests/unit/test_deadlines.py fails if a new httpx stops honouring it.
    """
    transport = httpx.HTTPTransport(limits=limits)
    transport._pool._network_backend = DeadlineBackend()  # see the docstring
    return transport
