"""The Redis client of every part of the worker that reads or writes its state."""

from __future__ import annotations

import redis


def connect(
    url: str, *, timeout_s: float = 10.0, retry_on_timeout: bool = True, max_connections: int | None = None
) -> redis.Redis:
    """A client for ``url`` whose calls give up after ``timeout_s`` instead of hanging on a
    dead server, and which checks an idle connection before using it again.

    ``retry_on_timeout`` tries a timed-out call once more; a caller bound to answer in time
    (a metrics scrape) turns it off. ``max_connections`` bounds the pool (None: redis-py's default).
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=min(timeout_s, 5.0),
        health_check_interval=30,
        retry_on_timeout=retry_on_timeout,
        max_connections=max_connections,
    )
