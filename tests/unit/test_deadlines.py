"""The step's deadline bounds every socket operation of the HTTP clients, headers included."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import httpcore
import httpx
import pytest
from httpcore._backends.sync import SyncStream

from tests.support.cluster import wait_until
from worker.runtime.deadlines import (
    _DeadlineStream,
    bounded_transport,
    current,
    exchange_deadline,
    peer_closed,
    step_deadline,
)

TRICKLE_S = 0.05  # a byte every 50 ms: far inside any read timeout
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Padding: " + b"x" * 400 + b"\r\n\r\n{}"


@pytest.fixture
def trickling_server() -> Iterator[str]:
    """A loopback server that answers every request a byte at a time (about 20 s for the whole answer)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                for i in range(len(ANSWER)):
                    if stop.is_set():
                        return
                    try:
                        conn.sendall(ANSWER[i : i + 1])
                    except OSError:
                        break
                    time.sleep(TRICKLE_S)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    stop.set()
    thread.join(5)
    server.close()


def _client() -> httpx.Client:
    limits = httpx.Limits(max_connections=4)
    return httpx.Client(timeout=5.0, transport=bounded_transport(limits))


def test_headers_trickled_inside_every_read_timeout_end_at_the_step_deadline(trickling_server: str) -> None:
    started = time.monotonic()
    with _client() as client, step_deadline(0.5), pytest.raises(httpx.ReadTimeout):
        client.get(trickling_server)
    assert 0.4 < time.monotonic() - started < 2.0


def test_an_exchange_deadline_shorter_than_the_step_wins(trickling_server: str) -> None:
    started = time.monotonic()
    with _client() as client, step_deadline(30), exchange_deadline(0.3), pytest.raises(httpx.ReadTimeout):
        client.get(trickling_server)
    assert time.monotonic() - started < 1.5


def test_no_request_starts_once_the_deadline_has_passed(trickling_server: str) -> None:
    with _client() as client, step_deadline(0.0), pytest.raises(httpx.ConnectTimeout):
        client.get(trickling_server)


def test_without_a_deadline_only_the_clients_timeouts_apply() -> None:
    assert current() is None
    with step_deadline(10) as outer, step_deadline(60):
        # A lowered limit never widens an outer one.
        assert current() == outer
    assert current() is None


def _pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    return server, client, accepted


def test_an_idle_connection_the_server_closed_or_reset_is_seen_from_its_tcp_state() -> None:
    server, client, accepted = _pair()
    try:
        assert peer_closed(client) is False
        accepted.close()  # the server's FIN
        wait_until(lambda: peer_closed(client) is True, 5.0, "the closed state")
    finally:
        client.close()
        server.close()
    server, client, accepted = _pair()
    try:
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted.close()  # a reset
        wait_until(lambda: peer_closed(client) is True, 5.0, "the closed state")
    finally:
        client.close()
        server.close()


def test_a_state_that_cannot_be_read_leaves_the_check_to_a_poll() -> None:
    left, right = socket.socketpair()  # not TCP
    try:
        assert peer_closed(left) is None
        assert peer_closed(None) is None
    finally:
        left.close()
        right.close()


def test_a_pooled_connection_the_server_closed_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server that closes each connection a moment after answering on it, keep-alive announced.
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            accepted.append(1)
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    # The pool's check of its idle connections must not be httpcore's poll.
    polled: list[object] = []
    monkeypatch.setattr(httpcore._backends.sync, "is_socket_readable", lambda sock: polled.append(sock) or False)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/"
    with _client() as client:
        assert client.get(url).status_code == 200
        time.sleep(0.6)  # the server has closed the idle connection by now
        assert client.get(url).status_code == 200  # on a new connection
    thread.join(5)
    server.close()
    assert len(accepted) == 2
    assert polled == []


class _CountingSocket(socket.socket):
    settimeouts = 0

    def settimeout(self, value: float | None) -> None:
        type(self).settimeouts += 1
        super().settimeout(value)


def test_a_stream_sets_its_sockets_timeout_only_when_the_value_changes() -> None:
    server, client, accepted = _pair()
    counted = _CountingSocket(client.family, client.type, client.proto, fileno=client.detach())
    stream = _DeadlineStream(SyncStream(counted))
    try:
        for _ in range(3):
            stream.write(b"ping", timeout=5.0)
        accepted.sendall(b"pong")
        assert stream.read(64, timeout=5.0) == b"pong"
        assert _CountingSocket.settimeouts == 1  # httpcore's stream: once per read and write
        with step_deadline(0.2), pytest.raises(httpcore.ReadTimeout):
            stream.read(64, timeout=5.0)  # nothing comes: the deadline's shorter timeout applies
        assert _CountingSocket.settimeouts == 2
    finally:
        stream.close()
        accepted.close()
        server.close()
