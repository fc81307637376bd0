"""The step's deadline bounds every socket operation of the HTTP clients, headers included."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from worker.runtime.deadlines import bounded_transport, current, exchange_deadline, step_deadline

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
