"""The state client's pool: each thread keeps its connection, and gets a working one back after a loss."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from worker.local.redisserver import LocalRedis
from worker.state.connect import KernelTimeoutConnection, ThreadAffinePool, _packed, connect, execute


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRedis]:
    with LocalRedis() as local:
        yield local


def test_each_thread_keeps_one_connection_across_commands_and_pipelines(server: LocalRedis) -> None:
    client = connect(server.url)
    assert isinstance(client.connection_pool, ThreadAffinePool)
    used: dict[int, set[int]] = {}

    def work(n: int) -> None:
        for _ in range(20):
            client.incr("pool:n")
            pipe = client.pipeline(transaction=False)
            pipe.incr("pool:n")
            pipe.execute()
            used.setdefault(n, set()).add(client.client_id())

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert int(client.get("pool:n") or 0) == 6 * 20 * 2
    # One server-side client per thread for all of its commands, and six in all.
    assert all(len(ids) == 1 for ids in used.values())
    assert len(set().union(*used.values())) == 6
    client.close()


def test_a_connection_the_server_dropped_is_replaced_on_next_use(server: LocalRedis) -> None:
    client = connect(server.url)
    client.set("pool:k", "v")
    first = client.client_id()
    admin = redis.Redis.from_url(server.url)
    admin.client_kill_filter(_id=first)
    assert client.get("pool:k") == b"v"  # retried on a new connection
    assert client.client_id() != first
    admin.close()
    client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_share_its_parents_connection(server: LocalRedis) -> None:
    client = connect(server.url)
    parent = client.client_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its connection's id, then leave at once
        try:
            os.write(write, str(client.client_id()).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = int(os.read(read, 64))
    os.waitpid(pid, 0)
    os.close(read)
    assert child != parent
    assert client.client_id() == parent  # the parent's is untouched
    client.close()


def test_the_connection_of_a_thread_that_ended_goes_back_to_the_pool(server: LocalRedis) -> None:
    # A threaded HTTP server (the metrics endpoint) runs each request in a new thread.
    client = connect(server.url, max_connections=4)

    def once() -> None:
        client.incr("pool:short")

    for _ in range(20):  # more threads than the pool has connections, one after another
        thread = threading.Thread(target=once)
        thread.start()
        thread.join()
    assert int(client.get("pool:short") or 0) == 20
    pool = client.connection_pool
    # One connection served them all in turn; the main thread now holds it.
    assert pool._created_connections == 1
    assert len(pool._in_use_connections) == 1
    client.close()


def _kernel_timeout(sock: socket.socket, option: int) -> float:
    seconds, micros = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("ll")))
    return float(seconds + micros / 1_000_000)


def test_a_command_is_one_send_and_one_receive_on_a_blocking_socket_the_kernel_times_out(server: LocalRedis) -> None:
    # Python would poll before each send and receive of a socket with a timeout.
    client = connect(server.url, timeout_s=2.5)
    client.set("pool:kernel", "1")
    client.eval("return 1", 0)
    connection = client.connection_pool.get_connection()
    assert isinstance(connection, KernelTimeoutConnection)
    sock = connection._sock
    assert sock is not None and sock.gettimeout() is None
    assert _kernel_timeout(sock, socket.SO_RCVTIMEO) == _kernel_timeout(sock, socket.SO_SNDTIMEO) == 2.5
    # TLS and Unix sockets keep redis-py's own connections.
    assert connect("rediss://127.0.0.1:1").connection_pool.connection_class is redis.SSLConnection
    assert connect("unix:///tmp/nowhere.sock").connection_pool.connection_class is redis.UnixDomainSocketConnection


def test_a_server_that_never_answers_times_out_as_before() -> None:
    # Accepts, reads nothing, answers nothing: the kernel's timeout ends the wait.
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    client = connect(f"redis://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.3, retry_on_timeout=False)
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    assert time.monotonic() - started < 5
    silent.close()


def test_commands_sent_together_answer_in_order_a_refusal_in_its_place(server: LocalRedis) -> None:
    client = connect(server.url)
    client.set("exec:text", "abc")
    commands = [("SET", "exec:k", "v"), ("INCR", "exec:text"), ("GET", "exec:k"), ("INCRBY", "exec:n", 2)]
    answers = execute(client, commands)
    assert answers[0] is True or answers[0] == b"OK"
    # Read whole, so the replies after it are the right ones.
    assert isinstance(answers[1], redis.ResponseError)
    assert answers[2:] == [b"v", 2]
    (alone,) = execute(client, [("GET", "exec:k")])
    assert alone == b"v"
    client.close()


def test_commands_are_packed_as_redis_py_packs_them(server: LocalRedis) -> None:
    client = connect(server.url)
    conn = client.connection_pool.get_connection()
    commands = [("EVALSHA", "0" * 40, 2, "k:é", b"\xff\x00", "[1,2]", 17, 2.5), ("GET", "k")]
    assert b"".join(_packed(conn, commands)) == b"".join(conn.pack_commands(commands))
    client.connection_pool.release(conn)
    client.close()


def test_commands_sent_together_survive_a_dropped_connection(server: LocalRedis) -> None:
    client = connect(server.url)
    first = client.client_id()
    admin = redis.Redis.from_url(server.url)
    admin.client_kill_filter(_id=first)
    # Retried on a new connection, as the client's own calls are.
    assert execute(client, [("SET", "exec:after", "1"), ("GET", "exec:after")])[1] == b"1"
    assert client.client_id() != first
    admin.close()
    client.close()
