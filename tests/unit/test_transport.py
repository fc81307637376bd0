"""The clients' transport: one pool per shard of threads, the limits kept in all."""

from __future__ import annotations

import threading
from collections import Counter

import httpx

from tests.support.settings import make_settings
from worker.local.receiver import Receiver
from worker.polling.check365 import make_client
from worker.runtime.context import make_webhook_client
from worker.runtime.deadlines import DeadlineBackend
from worker.runtime.transport import SHARD_CONNECTIONS, ThreadShardedTransport


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
