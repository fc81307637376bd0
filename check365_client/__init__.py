"""check365_client: enqueue Check365 watches and read their state, from any Python service.

    from check365_client import enqueue_watch, get_watch

    enqueue_watch("J-42", "https://hooks.example.com/check365", {"order": 17}, broker_url=REDIS_URL)
    get_watch("J-42", broker_url=REDIS_URL)  # WatchState(state='active', polls=3, ...) or None

It imports nothing of the worker and reads no environment variable, so it works inside a
service that has its own ``config`` package or ``worker`` module and its own ``REDIS_URL``.
"""

from __future__ import annotations

from check365_client.client import Check365Client, WatchState, enqueue_watch, get_watch
from check365_client.errors import (
    BrokerUnavailable,
    ClientError,
    EndpointsFileError,
    InvalidWatchRequest,
    UnregisteredEndpoint,
    UnsafeCallbackURL,
)
from check365_client.names import DEFAULT_QUEUE, WATCH_TASK

__all__ = [
    "DEFAULT_QUEUE",
    "WATCH_TASK",
    "BrokerUnavailable",
    "Check365Client",
    "ClientError",
    "EndpointsFileError",
    "InvalidWatchRequest",
    "UnregisteredEndpoint",
    "UnsafeCallbackURL",
    "WatchState",
    "enqueue_watch",
    "get_watch",
]
