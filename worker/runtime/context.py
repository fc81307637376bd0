"""The collaborators a step needs, built once per worker process.

The worker's steps run in threads of one process (worker/runtime/celeryconfig.py) and
share these: httpx clients and redis-py's connection pool are thread-safe, and their
pools are sized for every thread at once (the clients' pools sharded by thread, see
worker/runtime/transport.py). ``process_context`` builds them lazily in the process that
uses them, and again after a fork (a prefork pool, if one is chosen on the command line).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import httpx
import redis

from worker.delivery.limits import EndpointLimitsFor, default_limits
from worker.delivery.policy import CallbackPolicy
from worker.delivery.urls import Resolver, system_resolver
from worker.polling.check365 import make_client
from worker.polling.ratelimit import RateLimiter
from worker.runtime.celeryconfig import WORKER_THREADS
from worker.runtime.transport import ThreadShardedTransport
from worker.settings import Settings
from worker.state.connect import connect
from worker.state.endpoints import EndpointState
from worker.state.outbox import Outbox
from worker.state.store import Clock
from worker.state.watches import WatchStore


@dataclass
class Context:
    settings: Settings
    redis: redis.Redis
    watches: WatchStore
    outbox: Outbox
    check365: httpx.Client
    webhooks: WebhookClients
    limiter: RateLimiter
    clock: Clock
    rng: random.Random
    resolver: Resolver
    endpoints: EndpointState
    # The limits of each endpoint (cap, breaker): one function, so that limits declared
    # per endpoint can stand in for the defaults.
    endpoint_limits: EndpointLimitsFor
    # True where whoever runs a step delivers the single event its finish leases to it
    # at once (the worker's tasks): that event's first attempt then passes its endpoint's
    # gate in the finish's own round trip (WatchStore.finish). False, the step's caller
    # may deliver it later or not at all (a test playing a step that dies), and the
    # attempt passes the gate when it is made.
    gate_on_finish: bool = False

    def close(self) -> None:
        self.check365.close()
        self.webhooks.close()
        self.redis.close()


def webhook_timeout(policy: CallbackPolicy) -> httpx.Timeout:
    """The timeouts of one attempt, from its endpoint's ``timeout_s`` or ``WEBHOOK_TIMEOUT_S``."""
    t = policy.timeout_s
    return httpx.Timeout(t, connect=min(10.0, t))


def make_webhook_client(
    settings: Settings, transport: httpx.BaseTransport | None = None, *, max_connections: int = WORKER_THREADS
) -> httpx.Client:
    t = settings.webhook_timeout_s
    # Idle connections are kept (httpx closes them after 5 s unused): closing one per
    # delivery would cost a TCP and TLS handshake on the next.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.Client(
        # Each request passes its endpoint's own (webhook_timeout): this is the default.
        timeout=httpx.Timeout(t, connect=min(10.0, t)),
        limits=limits,
        # A redirect is a failed attempt: following it would send signed results to
        # an address nobody checked.
        follow_redirects=False,
        # A proxy from the environment would resolve the host itself and undo the
        # address pinning that defeats DNS rebinding.
        trust_env=False,
        transport=transport or ThreadShardedTransport(limits),
    )


class WebhookClients:
    """One webhook client per TLS server name.

    Requests go to the checked IP address, and httpx pools connections by address:
    a connection whose certificate was verified for one name must never carry a
    request for another name served from the same address.
    """

    MAX_CLIENTS = 64

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        self._settings = settings
        self._transport = transport
        self._clients: OrderedDict[str | None, httpx.Client] = OrderedDict()
        self._lock = threading.Lock()

    def for_server_name(self, server_name: str | None) -> httpx.Client:
        with self._lock:
            client = self._clients.get(server_name)
            if client is None:
                client = make_webhook_client(self._settings, self._transport)
                self._clients[server_name] = client
                if len(self._clients) > self.MAX_CLIENTS:
                    # Requests of other threads may still use it: httpx fails them as
                    # connection errors, retried like any other.
                    _, oldest = self._clients.popitem(last=False)
                    oldest.close()
            else:
                self._clients.move_to_end(server_name)
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


def redis_client(settings: Settings) -> redis.Redis:
    # Every thread may hold a connection at once, plus the metrics endpoint's gauges.
    return connect(settings.redis_url, max_connections=WORKER_THREADS + 16)


def build_context(
    settings: Settings,
    *,
    check365_transport: httpx.BaseTransport | None = None,
    webhook_transport: httpx.BaseTransport | None = None,
    clock: Clock = time.time,
    resolver: Resolver = system_resolver,
    rng: random.Random | None = None,
    endpoint_limits: EndpointLimitsFor | None = None,
) -> Context:
    client = redis_client(settings)
    outbox = Outbox(client, state_ttl_s=settings.state_ttl_s)
    return Context(
        settings=settings,
        redis=client,
        watches=WatchStore(client, state_ttl_s=settings.state_ttl_s),
        outbox=outbox,
        check365=make_client(settings, transport=check365_transport, max_connections=WORKER_THREADS),
        webhooks=WebhookClients(settings, transport=webhook_transport),
        limiter=RateLimiter(client, settings.check365_max_rps),
        clock=clock,
        rng=rng or random.Random(),
        resolver=resolver,
        endpoints=EndpointState(client, due_key=outbox.items.due_key, rearm_grace_s=settings.rearm_grace_s),
        endpoint_limits=endpoint_limits or default_limits(settings),
    )


_context: Context | None = None
_context_pid: int | None = None
_context_lock = threading.Lock()


def process_context(settings: Settings) -> Context:
    global _context, _context_pid  # noqa: PLW0603 - one context per process is the point
    with _context_lock:
        if _context is None or _context_pid != os.getpid():
            _context = replace(build_context(settings), gate_on_finish=True)
            _context_pid = os.getpid()
        return _context
