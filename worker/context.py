"""The collaborators a step needs, built once per worker process.

Celery's prefork pool forks after the app is imported: connections made before the
fork would be shared by every child. ``process_context`` builds them lazily in the
process that uses them, and again after a fork.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import httpx
import redis

from config.settings import Settings
from worker.check365 import make_client
from worker.outbox import Outbox
from worker.ratelimit import RateLimiter
from worker.store import Clock
from worker.urls import Resolver, system_resolver
from worker.watches import WatchStore


@dataclass
class Context:
    settings: Settings
    redis: redis.Redis
    watches: WatchStore
    outbox: Outbox
    check365: httpx.Client
    webhooks: httpx.Client
    limiter: RateLimiter
    clock: Clock
    rng: random.Random
    resolver: Resolver

    def close(self) -> None:
        self.check365.close()
        self.webhooks.close()
        self.redis.close()


def make_webhook_client(settings: Settings, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    t = settings.webhook_timeout_s
    return httpx.Client(
        timeout=httpx.Timeout(t, connect=min(10.0, t)),
        limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
        # A redirect is a failed attempt: following it would send signed results to
        # an address nobody checked.
        follow_redirects=False,
        transport=transport,
    )


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=True,
    )


def build_context(
    settings: Settings,
    *,
    check365_transport: httpx.BaseTransport | None = None,
    webhook_transport: httpx.BaseTransport | None = None,
    clock: Clock = time.time,
    resolver: Resolver = system_resolver,
    rng: random.Random | None = None,
) -> Context:
    client = redis_client(settings)
    return Context(
        settings=settings,
        redis=client,
        watches=WatchStore(client, state_ttl_s=settings.state_ttl_s),
        outbox=Outbox(client, state_ttl_s=settings.state_ttl_s),
        check365=make_client(settings, transport=check365_transport),
        webhooks=make_webhook_client(settings, transport=webhook_transport),
        limiter=RateLimiter(client, settings.check365_max_rps),
        clock=clock,
        rng=rng or random.Random(),
        resolver=resolver,
    )


_context: Context | None = None
_context_pid: int | None = None


def process_context(settings: Settings) -> Context:
    global _context, _context_pid  # noqa: PLW0603 - one context per process is the point
    if _context is None or _context_pid != os.getpid():
        _context = build_context(settings)
        _context_pid = os.getpid()
    return _context
