"""Prometheus metrics of a worker: counters and histograms from every pool process,
and pool-wide gauges read from Redis.

Celery's prefork pool runs tasks in child processes, each with its own memory, so the
counters use prometheus_client's multiprocess mode: every process writes its values
to files in one directory, and the HTTP server in the worker's main process adds them
up when scraped. Counts of dead children stay in the sum, as counters must.

prometheus_client chooses between in-memory values and files once, when its
``values`` module is first imported, by looking for PROMETHEUS_MULTIPROC_DIR. So this
module imports prometheus_client only inside functions: the worker's main process
creates a fresh directory and sets the variable in ``worker_init``, which runs before
the pool forks and before any metric object exists; the metric objects are created on
first use, in the process that uses them, and children inherit the variable.

With METRICS_PORT=0 nothing is set up: the metrics live in prometheus_client's
default in-process registry, which costs a few attribute look-ups per call and which
nobody reads. A metric must never break the step that records it, so every recording
function swallows (and logs once) any error, for example a full disk under the
multiprocess directory.

The gauges (backlogs, the last sweep, pauses; see ``worker.ops.pool``) describe the
whole deployment, not one worker: they are read from Redis at scrape time, so every
worker reports the same values and a dashboard should use ``max`` rather than ``sum``
for them.

The same port answers ``/healthz`` (the process serves) and ``/readyz`` (it consumes
and Redis answers), for container healthchecks and orchestrators.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Final, ParamSpec
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis

from worker.errors import Check365Misconfigured, Check365Throttled, PermanentError
from worker.ops.pool import PAUSE_CAUSES, PoolReader, PoolState
from worker.runtime import logs
from worker.settings import Settings
from worker.state.connect import connect
from worker.state.endpoints import BREAKER_STATES, EndpointState

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication as WSGIApp

    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

log = logs.get_logger("check365.metrics")

P = ParamSpec("P")

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# In containers the endpoint must be reachable from the scraper, outside the container.
DEFAULT_ADDR: Final = "0.0.0.0"  # noqa: S104 - deliberate, see the line above

WATCH_OUTCOMES: Final = ("completed", "failed", "timed_out", "callback_refused")
POLL_OUTCOMES: Final = (
    "running",
    "completed",
    "incomplete",
    "failed",
    "rejected",
    "transient",
    "misconfigured",
    "unauthorized",
    "throttled",
)
DELIVERY_OUTCOMES: Final = ("delivered", "failed", "dead_lettered")
DEAD_LETTER_REASONS: Final = ("gone", "retries_exhausted", "unsafe_callback", "held_past_schedule")
CHECK365_ERROR_KINDS: Final = (
    "unavailable",
    "misconfigured",
    "rate_limited",
    "unauthorized",
    "job_not_found",
    "bad_request",
)

# Check365 answers in well under a second when healthy; the read timeout defaults to 30 s.
REQUEST_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Gaps between polls grow to POLL_MAX_DELAY_S (300 s by default) for slow jobs.
DETECTION_LAG_BUCKETS: Final = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# A webhook attempt times out after WEBHOOK_TIMEOUT_S (15 s by default).
DELIVERY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)
# Endpoints with series of their own, the most recently active first: the label's
# cardinality stays bounded however many hosts callbacks have named.
MAX_ENDPOINT_SERIES: Final = 200
# A scrape must answer even when Redis does not: Prometheus' default scrape timeout is 10 s.
REDIS_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True)
class _Metrics:
    watches_started: Counter
    watch_outcomes: Counter
    polls: Counter
    request_seconds: Histogram
    detection_lag: Histogram
    deliveries: Counter
    delivery_seconds: Histogram
    dead_letters: Counter
    check365_errors: Counter


_lock = threading.Lock()
_metrics: _Metrics | None = None
_failure_logged = False


def _create() -> _Metrics:
    from prometheus_client import Counter, Histogram

    metrics = _Metrics(
        watches_started=Counter("check365_watches_started", "Watches created (duplicate enqueues excluded)."),
        watch_outcomes=Counter("check365_watch_outcomes", "Watches finished, by outcome.", ["outcome"]),
        polls=Counter(
            "check365_polls",
            "Poll steps, by outcome: what Check365 answered (running, completed, incomplete, failed), "
            "rejected (refused for good), transient (5xx, 429, timeout, garbage), misconfigured (an "
            "answer that is not Check365's: check CHECK365_BASE_URL), unauthorized (the API key "
            "refused: the pool pauses, watches fail after CHECK365_AUTH_GRACE_S) or throttled "
            "(deferred by the pool-wide rate limit, no request sent).",
            ["outcome"],
        ),
        request_seconds=Histogram(
            "check365_request_seconds", "Latency of bulk-status requests to Check365.", buckets=REQUEST_BUCKETS
        ),
        detection_lag=Histogram(
            "check365_detection_lag_seconds",
            "At the poll that saw a job completed, seconds since the previous poll: an upper bound "
            "of how late the completion was noticed.",
            buckets=DETECTION_LAG_BUCKETS,
        ),
        deliveries=Counter(
            "check365_deliveries",
            "Webhook attempts, by outcome: delivered (2xx), failed (will be retried) or dead_lettered.",
            ["outcome"],
        ),
        delivery_seconds=Histogram(
            "check365_delivery_seconds", "Latency of webhook attempts.", buckets=DELIVERY_BUCKETS
        ),
        dead_letters=Counter("check365_dead_letters", "Events dead-lettered, by reason.", ["reason"]),
        check365_errors=Counter(
            "check365_api_errors",
            "Check365 requests that failed, by kind: unavailable (5xx, timeout, connection error, garbage, "
            "success false), misconfigured (an answer that is not Check365's: check CHECK365_BASE_URL), "
            "rate_limited (429), unauthorized, job_not_found, bad_request, and any kind an error names.",
            ["kind"],
        ),
    )
    # Every known label value starts at zero, so that rate() and alerts see a series
    # from the first scrape instead of a gap until the first such event.
    for outcome in WATCH_OUTCOMES:
        metrics.watch_outcomes.labels(outcome)
    for outcome in POLL_OUTCOMES:
        metrics.polls.labels(outcome)
    for outcome in DELIVERY_OUTCOMES:
        metrics.deliveries.labels(outcome)
    for reason in DEAD_LETTER_REASONS:
        metrics.dead_letters.labels(reason)
    for kind in CHECK365_ERROR_KINDS:
        metrics.check365_errors.labels(kind)
    return metrics


def _get() -> _Metrics:
    global _metrics  # noqa: PLW0603 - one set of metric objects per process is the point
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _create()
    return _metrics


def _safely(func: Callable[P, None]) -> Callable[P, None]:
    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        global _failure_logged  # noqa: PLW0603 - one log line per process, not one per call
        try:
            func(*args, **kwargs)
        except Exception as exc:  # a metric must never fail the poll or delivery it describes
            if not _failure_logged:
                _failure_logged = True
                log.warning("metrics_failed", error=f"{type(exc).__name__}: {exc}"[:300])

    return wrapper


# --------------------------------------------------------------------------- recording


@_safely
def watch_started() -> None:
    _get().watches_started.inc()


@_safely
def watch_finished(outcome: str) -> None:
    _get().watch_outcomes.labels(outcome).inc()


@_safely
def poll(outcome: str, error: Exception | None = None) -> None:
    """Count a poll step; a failed request is also counted by the kind of its ``error``."""
    metrics = _get()
    metrics.polls.labels(outcome).inc()
    if error is not None:
        metrics.check365_errors.labels(error_kind(error)).inc()


@_safely
def detection_lag(seconds: float) -> None:
    _get().detection_lag.observe(max(0.0, seconds))


@_safely
def _observe_request(seconds: float) -> None:
    _get().request_seconds.observe(seconds)


@contextlib.contextmanager
def check365_request() -> Iterator[None]:
    """Time one bulk-status request, whether it answers or raises."""
    started = time.monotonic()
    try:
        yield
    finally:
        _observe_request(time.monotonic() - started)


def error_kind(exc: Exception) -> str:
    """The ``kind`` label of a failed Check365 request.

    An error class may name its own kind with a ``kind`` attribute; otherwise a
    permanent refusal is counted by its reason and anything else is ``unavailable``.
    """
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str) and kind:
        return kind
    if isinstance(exc, PermanentError):
        return exc.reason
    if isinstance(exc, Check365Throttled):
        return "rate_limited"
    if isinstance(exc, Check365Misconfigured):
        return "misconfigured"
    return "unavailable"


@_safely
def delivery(outcome: str) -> None:
    _get().deliveries.labels(outcome).inc()


@_safely
def delivery_attempt(seconds: float, *, sent: bool = True) -> None:
    # An attempt refused before sending (unsafe URL) took no time worth measuring.
    if sent:
        _get().delivery_seconds.observe(seconds)


@_safely
def dead_lettered(reason: str) -> None:
    metrics = _get()
    metrics.deliveries.labels("dead_lettered").inc()
    metrics.dead_letters.labels(reason).inc()


# --------------------------------------------------------------------------- exposition


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, documentation, value=value)


def pool_families(state: PoolState) -> Iterator[GaugeMetricFamily]:
    """The pool-wide gauges of one reading of Redis."""
    from prometheus_client.core import GaugeMetricFamily

    yield _gauge("check365_watches_active", "Watches not yet finished, in the whole deployment.", state.watches_active)
    yield _gauge(
        "check365_watches_overdue",
        "Watches whose next poll is past due and not running (queued, or lost and awaiting the sweep).",
        state.watches_overdue.count,
    )
    yield _gauge(
        "check365_watches_oldest_overdue_seconds",
        "How long past due the most overdue poll is (0 when none is).",
        state.watches_overdue.oldest_age_s,
    )
    yield _gauge(
        "check365_deliveries_pending",
        "Webhook events not yet delivered nor dead-lettered, in the whole deployment.",
        state.events_pending.count,
    )
    yield _gauge(
        "check365_deliveries_oldest_pending_seconds",
        "Age of the oldest webhook event not yet delivered nor dead-lettered (0 when none is).",
        state.events_pending.oldest_age_s,
    )
    yield _gauge(
        "check365_deliveries_overdue",
        "Webhook events whose next attempt is past due and not running.",
        state.events_overdue.count,
    )
    yield _gauge(
        "check365_deliveries_oldest_overdue_seconds",
        "How long past due the most overdue delivery attempt is (0 when none is).",
        state.events_overdue.oldest_age_s,
    )
    yield _gauge(
        "check365_dead_letters_stored",
        "Dead-lettered events waiting for a replay, in the whole deployment.",
        state.dead_letters,
    )
    if state.last_sweep is not None:
        yield _gauge(
            "check365_last_sweep_timestamp_seconds",
            "When the latest sweep ran (unix seconds): beat is alive while it keeps up with SWEEP_INTERVAL_S.",
            state.last_sweep,
        )
    paused = GaugeMetricFamily(
        "check365_paused",
        "1 while the pool holds its Check365 requests back, by cause: rate_limit (polls wait for a turn), "
        "retry_after (Check365 asked to wait), key_refused (Check365 refuses the API key).",
        labels=["cause"],
    )
    remaining = GaugeMetricFamily(
        "check365_pause_remaining_seconds",
        "Seconds until Check365 requests flow again, by cause (0 when not paused).",
        labels=["cause"],
    )
    for cause in PAUSE_CAUSES:
        paused.add_metric([cause], 1 if cause in state.pauses else 0)
        if cause != "key_refused":
            remaining.add_metric([cause], state.pauses.get(cause, 0.0))
    yield paused
    yield remaining
    yield _gauge(
        "check365_key_refused_seconds",
        "How long Check365 has been refusing the API key (0 while it accepts it).",
        state.pauses.get("key_refused", 0.0),
    )


def _pool_collector(redis_url: str) -> Collector:
    # Defined here, not at module level, because subclassing Collector imports
    # prometheus_client, which must wait until the multiprocess directory is set.
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class PoolCollector(Collector):
        """Pool-wide gauges, read from Redis at every scrape."""

        def __init__(self) -> None:
            client = _redis(redis_url)
            self.reader = PoolReader(client)
            self._endpoints = EndpointState(client, due_key="", rearm_grace_s=0)

        def collect(self) -> Iterable[GaugeMetricFamily]:
            up = GaugeMetricFamily("check365_redis_up", "1 when Redis answered this scrape's gauge reads.")
            try:
                state = self.reader.read()
            except redis.RedisError:
                # No value is better than a wrong one: the gauges are left out of this scrape.
                up.add_metric([], 0)
                yield up
                return
            up.add_metric([], 1)
            yield up
            yield from pool_families(state)
            yield from self._endpoint_gauges()

        def _endpoint_gauges(self) -> Iterable[GaugeMetricFamily]:
            try:
                views = self._endpoints.views(time.time(), limit=MAX_ENDPOINT_SERIES)
            except redis.RedisError:
                return
            now = time.time()
            families = {
                "in_flight": GaugeMetricFamily(
                    "check365_endpoint_in_flight",
                    "Delivery attempts in flight towards the endpoint, pool-wide (slots reserved for "
                    "events let out of its waiting line included).",
                    labels=["endpoint"],
                ),
                "breaker": GaugeMetricFamily(
                    "check365_endpoint_breaker_state",
                    "The endpoint's circuit breaker: 0 closed, 1 half-open (a probe in flight), 2 open.",
                    labels=["endpoint"],
                ),
                "backlog": GaugeMetricFamily(
                    "check365_endpoint_backlog",
                    "The endpoint's events neither delivered nor dead-lettered.",
                    labels=["endpoint"],
                ),
                "oldest": GaugeMetricFamily(
                    "check365_endpoint_oldest_pending_age_seconds",
                    "Age of the endpoint's oldest pending event (0 when none).",
                    labels=["endpoint"],
                ),
            }
            for view in views:
                label = [view.endpoint]
                families["in_flight"].add_metric(label, view.in_flight)
                families["breaker"].add_metric(label, BREAKER_STATES.index(view.state))
                families["backlog"].add_metric(label, view.backlog)
                oldest = view.oldest_pending_at
                families["oldest"].add_metric(label, max(0.0, now - oldest) if oldest else 0.0)
            yield from families.values()

    return PoolCollector()


def _redis(redis_url: str) -> redis.Redis:
    return connect(redis_url, timeout_s=REDIS_TIMEOUT_S, retry_on_timeout=False)


def make_registry(redis_url: str) -> CollectorRegistry:
    """What the endpoint serves: every process's counters, plus the Redis gauges."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    registry.register(_pool_collector(redis_url))
    return registry


# --------------------------------------------------------------------------- health


class Health:
    """``/healthz`` and ``/readyz`` of the endpoint.

    Alive: the process serves HTTP. Ready: the worker has started consuming and is
    not shutting down, and Redis (the broker and the state store: one server,
    REDIS_URL) answers a ping.
    """

    def __init__(self, redis_url: str) -> None:
        self._redis = _redis(redis_url)
        self.consuming = False

    def ready(self) -> tuple[bool, dict[str, str]]:
        checks = {"worker": "consuming" if self.consuming else "not consuming (starting or shutting down)"}
        try:
            self._redis.ping()
            checks["redis"] = "ok"
        except redis.RedisError as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
        return self.consuming and checks["redis"] == "ok", checks


def make_app(registry: CollectorRegistry, health: Health) -> WSGIApp:
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _answer(start_response, 200, {"status": "alive"})
        if path == "/readyz":
            ready, checks = health.ready()
            status = "ready" if ready else "not ready"
            return _answer(start_response, 200 if ready else 503, {"status": status, **checks})
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    return app


def _answer(start_response: Callable[..., Any], status: int, body: dict[str, str]) -> list[bytes]:
    data = json.dumps(body).encode()
    reason = "OK" if status == 200 else "Service Unavailable"
    start_response(f"{status} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes come every few seconds: not worth a log line each."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _enable_multiprocess(directory: str) -> None:
    os.environ[MULTIPROC_ENV] = directory
    values: Any = sys.modules.get("prometheus_client.values")
    # Something imported prometheus_client before the worker started, so it chose
    # in-memory values: choose again, before any metric of ours is created.
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread
    directory: str
    addr: str
    port: int
    health: Health

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_server(settings: Settings, addr: str = DEFAULT_ADDR) -> MetricsServer:
    """Switch this process (and the children it forks later) to multiprocess mode and serve /metrics.

    Call it in the worker's main process before the pool forks.
    """
    # A fresh directory per worker: after a restart, PIDs repeat (always, in
    # containers) and stale files of a previous run would be added to the counts.
    directory = tempfile.mkdtemp(prefix="check365-metrics-")
    _enable_multiprocess(directory)
    health = Health(settings.redis_url)
    try:
        server = make_server(
            addr,
            settings.metrics_port,
            make_app(make_registry(settings.redis_url), health),
            server_class=_Server,
            handler_class=_Handler,
        )
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    # Created now, in the main process, so that every series is served from the first
    # scrape (at zero); pool children inherit the objects and write their own files.
    _get()
    return MetricsServer(server, thread, directory, addr, settings.metrics_port, health)


# --------------------------------------------------------------------------- Celery signals

_server: MetricsServer | None = None
_settings: Settings | None = None


def _on_worker_init(**_: Any) -> None:
    global _server  # noqa: PLW0603 - the one endpoint of this worker process
    if _settings is None or _settings.metrics_port == 0 or _server is not None:
        return
    try:
        _server = start_server(_settings, addr=_settings.metrics_addr)
    except OSError as exc:
        # Like a bad setting: stop at start-up with one line naming the variable.
        # SystemExit passes through Celery's signal dispatch, which logs and
        # swallows ordinary exceptions.
        print(
            f"check365-worker: configuration error: METRICS_PORT {_settings.metrics_port} cannot be served ({exc})",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _on_worker_ready(**_: Any) -> None:
    # Logged here rather than at start: logging is configured after worker_init.
    if _server is not None:
        _server.health.consuming = True
        log.info("metrics_started", port=_server.port, addr=_server.addr, directory=_server.directory)


def _on_worker_shutting_down(**_: Any) -> None:
    if _server is not None:
        _server.health.consuming = False


def _on_worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    # Runs in the exiting pool child, which inherited the main process's server object.
    if _server is None:
        return
    from prometheus_client import multiprocess

    # Only "live" gauges are removed; counters of the dead child stay in the sums.
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid or os.getpid(), path=_server.directory)  # type: ignore[no-untyped-call]


def _on_worker_shutdown(**_: Any) -> None:
    global _server  # noqa: PLW0603 - see _on_worker_init
    if _server is not None:
        _server.stop()
        _server = None


def connect_worker_signals(settings: Settings) -> None:
    """Serve metrics from every ``celery worker`` whose METRICS_PORT is set (beat is not a worker)."""
    global _settings  # noqa: PLW0603 - read by the signal receivers
    _settings = settings
    from celery import signals

    signals.worker_init.connect(_on_worker_init)
    signals.worker_ready.connect(_on_worker_ready)
    signals.worker_shutting_down.connect(_on_worker_shutting_down)
    signals.worker_process_shutdown.connect(_on_worker_process_shutdown)
    signals.worker_shutdown.connect(_on_worker_shutdown)
