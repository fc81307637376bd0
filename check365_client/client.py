"""Enqueue a watch and read its state, from any Python service that can reach the broker.

Nothing here reads the environment: the broker URL and every option are arguments, so
a service's own ``REDIS_URL`` or ``LOG_LEVEL`` cannot change what the client does.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from check365_client import tracing
from check365_client.endpoints import Endpoints, load_endpoints
from check365_client.errors import BrokerUnavailable
from check365_client.names import DEFAULT_QUEUE, WATCH_TASK, active_key, job_index_key, watch_key
from check365_client.rules import validate_watch_request


@dataclass(frozen=True)
class WatchState:
    """A watch as the worker last recorded it (read-only; times are unix seconds).

    ``state`` is ``active`` while the job is polled, then ``finished`` (``outcome``:
    ``completed``, ``failed`` or ``timed_out``) or ``cancelled``.
    """

    watch_id: str
    job_id: str
    callback_url: str
    state: str
    metadata: dict[str, Any] | None = None
    started_at: float = 0.0
    deadline: float = 0.0
    polls: int = 0
    last_status: str | None = None
    last_progress: float | None = None
    next_poll_at: float | None = None
    outcome: str | None = None
    finished_at: float | None = None
    # The webhook ids of its events, in order.
    events: tuple[str, ...] = field(default=())

    @property
    def active(self) -> bool:
        return self.state == "active"


def _number(value: str | None) -> float | None:
    try:
        out = float(value) if value else None
    except ValueError:
        return None
    return out if out is not None and math.isfinite(out) else None


def _watch_state(h: dict[str, str]) -> WatchState:
    try:
        metadata = json.loads(h["metadata"]) if h.get("metadata") else None
        events = json.loads(h.get("events") or "[]")
    except ValueError:
        metadata, events = None, []
    active = h.get("state") == "active"
    return WatchState(
        watch_id=h["watch_id"],
        job_id=h.get("job_id", ""),
        callback_url=h.get("callback_url", ""),
        state=h.get("state", ""),
        metadata=metadata if isinstance(metadata, dict) else None,
        started_at=_number(h.get("started_at")) or 0.0,
        deadline=_number(h.get("deadline")) or 0.0,
        polls=int(_number(h.get("polls")) or 0),
        last_status=h.get("last_status") or None,
        last_progress=_number(h.get("last_progress")),
        next_poll_at=_number(h.get("due")) if active else None,
        outcome=h.get("outcome") or None,
        finished_at=_number(h.get("finished_at")),
        events=tuple(str(e) for e in events) if isinstance(events, list) else (),
    )


class Check365Client:
    """Enqueues watches on ``broker_url`` and reads their state from the same Redis.

    ``allow_http`` and ``allow_private_networks`` must match the worker's
    ``WEBHOOK_ALLOW_HTTP`` and ``WEBHOOK_ALLOW_PRIVATE_NETWORKS`` (both false in
    production): the client refuses what the worker would. Safe to share between
    threads; build one per broker and keep it.

    ``endpoints_file`` is the worker's ``WEBHOOK_ENDPOINTS_FILE`` (read now; raises
    EndpointsFileError naming the endpoint and key; no secret's value is read): a callback
    URL that matches none of its endpoints is refused before anything is sent, as the
    workers refuse it with ``WEBHOOK_ENDPOINTS_ONLY=true`` (``endpoints_only=False`` keeps
    such URLs, for a pool that allows them), and an endpoint's own ``allow_http`` and
    ``allow_private_networks`` apply to its URLs.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        queue: str = DEFAULT_QUEUE,
        allow_http: bool = False,
        allow_private_networks: bool = False,
        endpoints_file: str | os.PathLike[str] | None = None,
        endpoints_only: bool = True,
    ) -> None:
        if not isinstance(broker_url, str) or not broker_url:
            raise ValueError("broker_url must be the Redis URL of the worker's broker")
        self.broker_url = broker_url
        self.queue = queue
        self.allow_http = allow_http
        self.allow_private_networks = allow_private_networks
        self.endpoints: Endpoints | None = load_endpoints(endpoints_file) if endpoints_file is not None else None
        self.endpoints_only = endpoints_only and self.endpoints is not None
        self._lock = threading.Lock()
        self._app: Any = None
        self._redis: Any = None

    def __repr__(self) -> str:
        # The broker URL may hold a password.
        return f"Check365Client(queue={self.queue!r})"

    def enqueue_watch(self, job_id: str, callback_url: str, metadata: dict[str, Any] | None = None) -> str:
        """Validate the request and enqueue it; return the message's id.

        Raises InvalidWatchRequest (nothing is sent) or BrokerUnavailable.
        """
        request = validate_watch_request(
            {"job_id": job_id, "callback_url": callback_url, "metadata": metadata},
            allow_http=self.allow_http,
            allow_private=self.allow_private_networks,
            endpoints=self.endpoints,
            endpoints_only=self.endpoints_only,
        )
        from kombu.exceptions import OperationalError

        # The trace of the watch starts here (with OpenTelemetry configured): the worker
        # continues it from the message's traceparent header.
        with tracing.span(
            "check365.enqueue_watch", kind="producer", attributes={"check365.job_id": request.job_id}
        ) as traced:
            try:
                result = self._sender().send_task(
                    WATCH_TASK, kwargs=request.kwargs(), queue=self.queue, headers=traced.headers() or None
                )
            except (OperationalError, OSError) as exc:
                raise BrokerUnavailable(f"could not enqueue on the broker: {type(exc).__name__}") from None
        return str(result.id)

    def get_watch(self, job_id: str, callback_url: str | None = None) -> WatchState | None:
        """The job's active watch (for ``callback_url`` if given), else its latest; None if it has none.

        A watch exists once a worker has taken its message; finished ones stay readable
        for the worker's ``STATE_TTL_S``.
        """
        watches = self.get_watches(job_id)
        if callback_url is not None:
            watches = [w for w in watches if w.callback_url == callback_url]
        candidates = [w for w in watches if w.active] or watches
        return candidates[-1] if candidates else None

    def get_watches(self, job_id: str) -> list[WatchState]:
        """Every stored watch of the job, oldest first."""
        from redis.exceptions import RedisError

        try:
            client = self._client()
            ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in client.smembers(job_index_key(job_id)))
            with client.pipeline(transaction=False) as pipe:
                for watch_id in ids:
                    pipe.hgetall(watch_key(watch_id))
                hashes = pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"could not read the watch state: {type(exc).__name__}") from None
        decoded = [{_text(k): _text(v) for k, v in h.items()} for h in hashes]
        watches = [_watch_state(h) for h in decoded if h.get("watch_id")]
        return sorted(watches, key=lambda w: w.started_at)

    def active_watch_id(self, job_id: str, callback_url: str) -> str | None:
        """The id of the watch active for the pair, if any."""
        from redis.exceptions import RedisError

        try:
            value = self._client().get(active_key(job_id, callback_url))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"could not read the watch state: {type(exc).__name__}") from None
        return _text(value) if value else None

    def close(self) -> None:
        with self._lock:
            if self._redis is not None:
                self._redis.close()
                self._redis = None
            if self._app is not None:
                self._app.close()
                self._app = None

    def __enter__(self) -> Check365Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sender(self) -> Any:
        with self._lock:
            if self._app is None:
                # Imported on first use: a service that only reads watches never loads Celery.
                from celery import Celery

                app = Celery("check365-client", broker=self.broker_url, set_as_current=False)
                # Fail in about a second when Redis is down, instead of Celery's default retries.
                app.conf.broker_connection_retry_on_startup = False
                app.conf.broker_transport_options = {"max_retries": 1, "socket_connect_timeout": 5}
                self._app = app
            return self._app

    def _client(self) -> Any:
        with self._lock:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self.broker_url, socket_connect_timeout=5, socket_timeout=10)
            return self._redis


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_clients: dict[tuple[str, str, bool, bool], Check365Client] = {}
_clients_lock = threading.Lock()


def _shared(broker_url: str, queue: str, allow_http: bool, allow_private_networks: bool) -> Check365Client:
    key = (broker_url, queue, allow_http, allow_private_networks)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = Check365Client(
                broker_url, queue=queue, allow_http=allow_http, allow_private_networks=allow_private_networks
            )
        return client


def _with_endpoints(client: Check365Client, endpoints_file: str | os.PathLike[str]) -> Check365Client:
    """``client``'s broker connection with the endpoints file read now (it may have changed since)."""
    checked = Check365Client(
        client.broker_url,
        queue=client.queue,
        allow_http=client.allow_http,
        allow_private_networks=client.allow_private_networks,
        endpoints_file=endpoints_file,
    )
    checked._app = client._sender()
    return checked


def enqueue_watch(
    job_id: str,
    callback_url: str,
    metadata: dict[str, Any] | None = None,
    *,
    broker_url: str,
    queue: str = DEFAULT_QUEUE,
    allow_http: bool = False,
    allow_private_networks: bool = False,
    endpoints_file: str | os.PathLike[str] | None = None,
) -> str:
    """Validate a watch request and enqueue it on ``broker_url``; return the message's id.

    Raises InvalidWatchRequest before anything is sent when a rule is broken (with
    ``endpoints_file``: UnregisteredEndpoint for a callback URL that matches none of its
    endpoints, see ``Check365Client``), and BrokerUnavailable when Redis cannot be
    reached. One client per broker is kept and reused.
    """
    client = _shared(broker_url, queue, allow_http, allow_private_networks)
    if endpoints_file is not None:
        client = _with_endpoints(client, endpoints_file)
    return client.enqueue_watch(job_id, callback_url, metadata)


def get_watch(job_id: str, callback_url: str | None = None, *, broker_url: str) -> WatchState | None:
    """The job's active watch (or its latest), read from the Redis at ``broker_url``."""
    return _shared(broker_url, DEFAULT_QUEUE, False, False).get_watch(job_id, callback_url)
