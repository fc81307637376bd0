"""The clients' transport: one pool per shard of threads, the limits kept in all."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from tests.support.settings import make_settings
from worker.local.receiver import Receiver
from worker.polling.check365 import make_client
from worker.runtime.context import make_webhook_client
from worker.runtime.deadlines import DeadlineBackend
from worker.runtime.transport import SHARD_CONNECTIONS, ThreadShardedTransport, open_response
from worker.settings import Settings


def _limits(transport: httpx.HTTPTransport) -> tuple[int, int]:
    pool = transport._pool
    return pool._max_connections, pool._max_keepalive_connections


def test_the_limits_are_cut_into_shards_of_a_few_connections_and_kept_in_all() -> None:
    transport = ThreadShardedTransport(httpx.Limits(max_connections=128, max_keepalive_connections=20))
    assert len(transport.shards) == 128 // SHARD_CONNECTIONS
    assert sum(_limits(s)[0] for s in transport.shards) == 128
    assert all(_limits(s) == (SHARD_CONNECTIONS, 2) for s in transport.shards)
    small = ThreadShardedTransport(httpx.Limits(max_connections=3, max_keepalive_connections=3))
    assert [_limits(s) for s in small.shards] == [(3, 3)]


def test_every_shard_bounds_its_sockets_by_the_step_deadline() -> None:
    transport = ThreadShardedTransport(httpx.Limits(max_connections=32))
    assert all(isinstance(s._pool._network_backend, DeadlineBackend) for s in transport.shards)


def test_threads_are_dealt_evenly_and_each_keeps_its_shard() -> None:
    transport = ThreadShardedTransport(httpx.Limits(max_connections=32))
    seen: dict[int, list[int]] = {}
    start = threading.Barrier(16)

    def run(n: int) -> None:
        start.wait()
        seen[n] = [id(transport.shard()) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(set(ids)) == 1 for ids in seen.values())
    assert sorted(Counter(ids[0] for ids in seen.values()).values()) == [4, 4, 4, 4]


def test_the_clients_a_process_builds_use_it_and_reach_a_real_server() -> None:
    settings = make_settings()
    with make_client(settings) as check365, make_webhook_client(settings) as webhooks:
        for client in (check365, webhooks):
            assert isinstance(client._transport, ThreadShardedTransport)
        with Receiver(settings.webhook_secrets[0]) as receiver:
            answers: list[int] = []

            def post() -> None:
                answers.append(webhooks.post(receiver.url + "/hooks/t", content=b"{}").status_code)

            threads = [threading.Thread(target=post) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len(answers) == 20


ClientOf = Callable[[Settings, httpx.BaseTransport], httpx.Client]


def _seen(client_of: ClientOf, send: Callable[[httpx.Client], httpx.Response]) -> httpx.Request:
    """The request the transport got when ``send`` ran against a client built by ``client_of``."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"ok")

    with client_of(make_settings(), httpx.MockTransport(answer)) as client:
        response = send(client)
        assert response.read() == b"ok"
        assert response.request is seen[0]
        response.close()
    return seen[0]


def _same(a: httpx.Request, b: httpx.Request) -> None:
    assert (a.method, a.url, a.read()) == (b.method, b.url, b.read())
    assert a.headers.multi_items() == b.headers.multi_items()
    assert a.extensions == b.extensions


@pytest.mark.parametrize("client_of", [make_client, make_webhook_client])
def test_a_request_sent_without_client_send_is_the_one_client_send_makes(client_of: ClientOf) -> None:
    url = "https://api.example.com/api/validation/bulk-status"
    params = {"api_key": "k&y", "job_id": "j 1"}
    _same(
        _seen(client_of, lambda c: open_response(c, "GET", url, params=params)),
        _seen(client_of, lambda c: c.send(c.build_request("GET", url, params=params), stream=True)),
    )
    headers = {"webhook-id": "msg_1", "Host": "hooks.example.com", "User-Agent": "ours"}
    timeout = httpx.Timeout(3.0, connect=1.0)
    extensions = {"sni_hostname": "hooks.example.com"}
    _same(
        _seen(
            client_of,
            lambda c: open_response(
                c, "POST", url, content=b"{}", headers=headers, timeout=timeout, extensions=extensions
            ),
        ),
        _seen(
            client_of,
            lambda c: c.send(
                c.build_request("POST", url, content=b"{}", headers=headers, timeout=timeout, extensions=extensions),
                stream=True,
            ),
        ),
    )


def test_a_request_on_a_closed_client_fails_as_a_connection_error() -> None:
    client = make_webhook_client(make_settings(), httpx.MockTransport(lambda r: httpx.Response(200)))
    client.close()
    with pytest.raises(httpx.ConnectError):
        open_response(client, "POST", "https://hooks.example.com/h", content=b"{}")
