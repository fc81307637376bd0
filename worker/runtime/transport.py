"""The HTTP transport of the worker's clients: connection pools sharded by thread.

httpcore's connection pool does its bookkeeping under one lock, and that bookkeeping
scans every queued request against every connection (and every connection against the
others) each time a request starts or ends. One pool shared by the pool's 128 threads
thus spends its time in that lock: with answers taking 250 ms, 128 threads sharing one
client made about 120 requests a second where 128 clients made about 480 (docs/design.md,
"Execution model"). So each client's pool is cut into shards of a few connections, and a
thread always uses the same shard: the bookkeeping stays small, and the total number of
connections is what the limits say.
"""

from __future__ import annotations

import itertools
import math
import threading

import httpx

from worker.runtime.deadlines import bounded_transport

# Connections per shard: a shard's threads rarely wait for one of its connections, and
# its bookkeeping scans a handful of them.
SHARD_CONNECTIONS = 8


class ThreadShardedTransport(httpx.BaseTransport):
    """``shards`` transports (``bounded_transport``), each serving the threads assigned to it.

    Threads are dealt to shards in turn as they make their first request, so that the
    threads of a pool spread evenly whatever their identifiers.
    """

    def __init__(self, limits: httpx.Limits, *, shard_connections: int = SHARD_CONNECTIONS) -> None:
        total = limits.max_connections
        shards = 1 if total is None else max(1, math.ceil(total / shard_connections))
        per_shard = None if total is None else math.ceil(total / shards)
        keepalive = limits.max_keepalive_connections
        shard_limits = httpx.Limits(
            max_connections=per_shard,
            max_keepalive_connections=None if keepalive is None else math.ceil(keepalive / shards),
            keepalive_expiry=limits.keepalive_expiry,
        )
        self.shards = tuple(bounded_transport(shard_limits) for _ in range(shards))
        self._turn = itertools.count()
        self._local = threading.local()

    def shard(self) -> httpx.HTTPTransport:
        """The calling thread's shard."""
        index: int | None = getattr(self._local, "index", None)
        if index is None:
            index = self._local.index = next(self._turn) % len(self.shards)
        return self.shards[index]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.shard().handle_request(request)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
