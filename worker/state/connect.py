"""The Redis client of every part of the worker that reads or writes its state."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import hiredis
import redis


class ThreadAffinePool(redis.ConnectionPool):
    """A connection pool in which each thread keeps the connection it first got.

    redis-py's pool checks a connection out and back in around every command: its lock,
    a poll of the socket for stray data, and its accounting and events, on each of a
    step's three or four calls. A thread runs one command at a time, so the connection
    it used last is always free when it asks again. A connection dropped after an error
    reconnects on its next use; after a fork, the child's threads get new ones. When a
    thread ends (a metrics scrape's, say), its connection goes back to the pool.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept = threading.local()

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        kept = getattr(self._kept, "held", None)
        if kept is not None and kept.pid == os.getpid():
            kept.connection.connect()  # at once when connected
            return kept.connection
        connection = super().get_connection()
        held = _Held(os.getpid(), connection)
        # A thread's locals go when it ends: its connection is then released.
        weakref.finalize(held, self._thread_ended, connection, held.pid)
        self._kept.held = held
        return connection

    def release(self, connection: Any) -> None:
        kept = getattr(self._kept, "held", None)
        if kept is not None and kept.connection is connection and kept.pid == os.getpid():
            return
        super().release(connection)

    def _thread_ended(self, connection: Any, pid: int) -> None:
        if pid == os.getpid():
            super().release(connection)


class KernelTimeoutConnection(redis.Connection):
    """A connection whose socket blocks, with its timeout kept by the kernel (``SO_RCVTIMEO``, ``SO_SNDTIMEO``).

    Python keeps a socket's timeout by polling before each send and receive: two system
    calls where one does, and in a worker each is a hand-off of the GIL between its
    threads. With the kernel keeping the timeout, a command is one send and one receive;
    A/B in the throughput benchmark, 0.15 ms less worker CPU per small job (three round
    trips). A send or receive that times out raises ``redis.TimeoutError``, as before.
    """

    def _connect(self) -> socket.socket:
        sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        timeout = self.socket_timeout
        if timeout:
            seconds = int(timeout)
            timeval = struct.pack("ll", seconds, round((timeout - seconds) * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            sock.settimeout(None)
        return sock

    def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().send_packed_command(*args, **kwargs)  # type: ignore[no-untyped-call]
        except redis.ConnectionError as exc:
            if _timed_out(exc):
                raise redis.TimeoutError(f"Timeout writing to {self.host}:{self.port}") from None
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ConnectionError as exc:
            if _timed_out(exc):
                raise redis.TimeoutError(f"Timeout reading from {self.host}:{self.port}") from None
            raise


def _timed_out(exc: BaseException) -> bool:
    """Whether redis-py's error comes from the kernel's timeout: a blocking call that failed with EAGAIN."""
    seen: BaseException | None = exc
    for _ in range(4):
        seen = seen.__cause__ or seen.__context__ if seen is not None else None
        if isinstance(seen, OSError) and seen.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return True
    return False


class _Held:
    __slots__ = ("__weakref__", "connection", "pid")

    def __init__(self, pid: int, connection: Any) -> None:
        self.pid = pid
        self.connection = connection


def execute(client: redis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Send ``commands`` in one round trip on the calling thread's connection; their replies, in order.

    A command Redis refused has its ``redis.ResponseError`` as its reply (as a pipeline's
    ``execute(raise_on_error=False)`` gives it); a lost connection or a timeout is retried
    as the client's own calls are (its connection's ``Retry``, disconnecting first). What
    ``Redis.execute_command`` and ``Pipeline`` add around this (response callbacks, which
    scripts have none of, operation metrics, a pipeline's command stack and reset) cost
    about 15 µs of CPU per call and 25 per pipeline: every step makes two or three.
    """
    pool = client.connection_pool
    conn: Any = client.connection or pool.get_connection()

    def attempt() -> list[Any]:
        conn.send_packed_command(_packed(conn, commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as refused:  # read whole: the next reply is intact
                replies.append(refused)
        return replies

    try:
        return conn.retry.call_with_retry(attempt, lambda _error: conn.disconnect())  # type: ignore[no-any-return]
    finally:
        if client.connection is None:
            pool.release(conn)


def _packed(conn: Any, commands: Sequence[Sequence[Any]]) -> Any:
    encoder = conn.encoder
    if encoder.encoding == "utf-8" and encoder.encoding_errors == "strict":
        # What redis-py's own packing ends in (hiredis is a dependency), without its
        # encoding of each argument in Python first: the same bytes for the str, bytes,
        # int and float arguments commands take.
        return [b"".join([hiredis.pack_command(tuple(command)) for command in commands])]
    return conn.pack_commands(commands)


def connect(
    url: str, *, timeout_s: float = 10.0, retry_on_timeout: bool = True, max_connections: int | None = None
) -> redis.Redis:
    """A client for ``url`` whose calls give up after ``timeout_s`` instead of hanging on a
    dead server, and which checks an idle connection before using it again.

    ``retry_on_timeout`` tries a timed-out call once more; a caller bound to answer in time
    (a metrics scrape) turns it off. ``max_connections`` bounds the pool (None: redis-py's
    default); each thread that uses the client holds one of them.
    """
    # Plain TCP only: a TLS socket (rediss://) and a Unix socket keep redis-py's own classes.
    plain = {"connection_class": KernelTimeoutConnection} if url.startswith("redis://") else {}
    pool = ThreadAffinePool.from_url(
        url,
        **plain,
        socket_timeout=timeout_s,
        socket_connect_timeout=min(timeout_s, 5.0),
        health_check_interval=30,
        retry_on_timeout=retry_on_timeout,
        max_connections=max_connections,
    )
    return redis.Redis(connection_pool=pool)
