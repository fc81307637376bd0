"""The HTTP transport of the worker's clients: connection pools sharded by thread.

httpcore's connection pool does its bookkeeping under one lock, and that bookkeeping
scans every queued request against every connection (and every connection against the
others) each time a request starts or ends. One pool shared by the pool's 128 threads
thus spends its time in that lock: with answers taking 250 ms, 128 threads sharing one
client made about 120 requests a second where 128 clients made about 480 (docs/design.md,
"Execution model"). So each client's pool is cut into shards of a few connections, and a
thread always uses the same shard: the bookkeeping stays small, and the total number of
connections is what the limits say.

``open_response`` sends a request through a client's transport, without ``Client.send``.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Mapping
from functools import lru_cache

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


@lru_cache(maxsize=1024)
def _parsed(url: str) -> httpx.URL:
    return httpx.URL(url)


def open_response(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    timeout: httpx.Timeout | None = None,
    extensions: Mapping[str, object] | None = None,
) -> httpx.Response:
    """Send one request with ``client``'s headers, timeouts and transport; its body is not read.

    The caller reads the answer and closes it. What ``Client.send`` adds around its transport
    (authentication, redirects, cookies, event hooks, its timer) is what our clients never use:
    they follow no redirect and keep no cookie. Skipping it, and parsing each URL once, took
    0.34 ms off the worker's CPU per small job (two requests) in the throughput benchmark; a
    unit test holds the request to the one ``Client.send`` makes. A closed client's request
    fails as a connection error, as a request in flight on it would.
    """
    request = httpx.Request(
        method,
        _parsed(url),
        params=params,
        headers=_merged(client.headers, headers),
        content=content,
        extensions={"timeout": (timeout or client.timeout).as_dict(), **(extensions or {})},
    )
    if client.is_closed:
        raise httpx.ConnectError("the client was closed", request=request)
    # Client._transport is what Client.send hands the request to when, as in every client
    # we make, no mount or proxy is configured.
    response = client._transport.handle_request(request)
    response.request = request
    return response


def _merged(defaults: httpx.Headers, headers: Mapping[str, str] | None) -> httpx.Headers:
    merged = defaults.copy()
    if headers:
        merged.update(headers)
    return merged
