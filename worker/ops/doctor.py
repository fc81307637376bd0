"""``check365-worker doctor``: check what a deployment needs, one line per check.

Each check is ``ok``, ``warn`` (works, but an operator should know: durability or
safety is weaker than the defaults give) or ``fail`` (something does not work: no
worker, no beat, messages nobody will ever run, the key refused). The exit status is
1 when any check fails, 0 otherwise.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import redis

from worker.errors import Check365Misconfigured, Check365Rejected, RetryableError, SettingsError
from worker.settings import Settings, load_settings
from worker.state.store import text

Status = Literal["ok", "warn", "fail"]

# A sweep is expected every SWEEP_INTERVAL_S; beat is reported down after this many
# intervals without one (the healthcheck command uses the same figure).
BEAT_SILENT_SWEEPS = 4
# Seconds a control command (ping, active queues) waits for the workers' answers.
CONTROL_TIMEOUT_S = 2.0
# Messages read per queue when looking for ours in queues nobody consumes.
PEEK_PER_QUEUE = 1000
# Where kombu's Redis transport records which queues were declared, and how it
# names a queue's list for each priority step (see kombu/transport/redis.py).
KOMBU_BINDINGS = "_kombu.binding.*"
KOMBU_SEP = "\x06\x16"
PRIORITY_STEPS = ("", f"{KOMBU_SEP}3", f"{KOMBU_SEP}6", f"{KOMBU_SEP}9")
# Celery's default queue: where a message sent without queue= lands.
CELERY_DEFAULT_QUEUE = "celery"
OUR_TASKS = "check365."


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "fail"


def _settings_checks() -> tuple[list[Check], Settings | None]:
    try:
        settings = load_settings(process="worker")
    except SettingsError as exc:
        return [Check("settings", "fail", str(exc))], None
    checks = [Check("settings", "ok", f"queue {settings.queue}, {len(settings.webhook_secrets)} webhook secret(s)")]
    endpoints = _endpoints_check(settings)
    if endpoints is not None:
        checks.append(endpoints)
    if settings.webhook_allow_http:
        checks.append(
            Check(
                "allow_http",
                "warn",
                "WEBHOOK_ALLOW_HTTP=true: callbacks may be plain http, readable and alterable on the way",
            )
        )
    if settings.webhook_allow_private_networks:
        checks.append(
            Check(
                "allow_private_networks",
                "warn",
                "WEBHOOK_ALLOW_PRIVATE_NETWORKS=true: callbacks may reach loopback, private and cloud metadata "
                "addresses (no SSRF protection)",
            )
        )
    if settings.check365_allow_http:
        checks.append(
            Check("check365_allow_http", "warn", "CHECK365_ALLOW_HTTP=true: the API key may travel in clear text")
        )
    return checks, settings


def _endpoints_check(settings: Settings) -> Check | None:
    """The endpoints file as loaded (a bad one already failed the settings check, naming endpoint and key)."""
    if not settings.webhook_endpoints_file:
        return None
    endpoints = settings.endpoints
    names = ", ".join(f"{e.name} ({len(endpoints.secrets_of(e.name))} secret(s))" for e in endpoints)
    if not names:
        return Check("endpoints", "warn", "the endpoints file registers no endpoint")
    only = "only these are allowed" if settings.webhook_endpoints_only else "other URLs use WEBHOOK_SECRET"
    return Check("endpoints", "ok", f"{names}; {only}")


def _redis_checks(client: redis.Redis) -> list[Check]:
    try:
        started = time.monotonic()
        client.ping()
        latency = (time.monotonic() - started) * 1000
        seconds, micros = client.time()
        skew = time.time() - (seconds + micros / 1e6)
        persistence = client.info("persistence")
        memory = client.info("memory")
    except redis.RedisError as exc:
        return [Check("redis", "fail", f"unreachable: {type(exc).__name__}")]
    checks = [
        Check("redis", "ok", f"ping {latency:.1f} ms"),
        Check("clock", "ok" if abs(skew) < 2.0 else "fail", f"skew against Redis {skew:+.3f} s"),
    ]
    if persistence.get("aof_enabled"):
        checks.append(Check("persistence", "ok", "AOF on"))
    else:
        checks.append(Check("persistence", "warn", "AOF off: a Redis restart loses the writes since the last snapshot"))
    policy = str(memory.get("maxmemory_policy", "noeviction"))
    if policy == "noeviction":
        checks.append(Check("eviction", "ok", "maxmemory-policy noeviction"))
    else:
        checks.append(
            Check(
                "eviction",
                "warn",
                f"maxmemory-policy {policy}: Redis may evict watches, events and queued messages when full "
                "(use noeviction)",
            )
        )
    return checks


def _worker_checks(settings: Settings, client: redis.Redis) -> list[Check]:
    from worker.intake.enqueue import client_app

    control = client_app(settings).control
    try:
        pongs = control.ping(timeout=CONTROL_TIMEOUT_S) or []
        queues = control.inspect(timeout=CONTROL_TIMEOUT_S).active_queues() or {}
    except Exception as exc:  # kombu raises several unrelated types when the broker is gone
        return [Check("workers", "fail", f"cannot ask the workers: {type(exc).__name__}")]
    names = sorted(name for pong in pongs for name in pong)
    consumed = {q.get("name") for worker_queues in queues.values() for q in worker_queues or []}
    checks = []
    if not names:
        checks.append(Check("workers", "fail", f"no worker answered a ping within {CONTROL_TIMEOUT_S:g} s"))
    elif settings.queue not in consumed:
        checks.append(
            Check("workers", "fail", f"{len(names)} worker(s) answer, but none consumes queue {settings.queue}")
        )
    else:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        checks.append(Check("workers", "ok", f"{len(names)} answered a ping: {shown}"))
    checks.append(_stray_messages_check(client, {str(q) for q in consumed if q}))
    return checks


def _declared_queues(client: redis.Redis) -> set[str]:
    queues = {CELERY_DEFAULT_QUEUE}
    for key in client.scan_iter(match=KOMBU_BINDINGS, count=100):
        for member in client.smembers(key):
            # routing key, pattern, queue: joined by kombu's separator
            queues.add(str(text(member)).split(KOMBU_SEP)[-1])
    return queues


def _our_tasks(raw_messages: list[Any]) -> Iterator[str]:
    for raw in raw_messages:
        try:
            message = json.loads(raw)
            task = message["headers"]["task"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(task, str) and task.startswith(OUR_TASKS):
            yield task


def _stray_messages_check(client: redis.Redis, consumed: set[str]) -> Check:
    """Messages for our tasks waiting in queues that no worker consumes: they would wait forever."""
    stray: Counter[tuple[str, str]] = Counter()
    for queue in sorted(_declared_queues(client) - consumed):
        for suffix in PRIORITY_STEPS:
            for task in _our_tasks(client.lrange(queue + suffix, 0, PEEK_PER_QUEUE - 1)):
                stray[(queue, task)] += 1
    if not stray:
        return Check("stray_messages", "ok", "no message for our tasks waits in a queue no worker consumes")
    parts = [f"{n} {task} in queue {queue!r}" for (queue, task), n in stray.most_common(5)]
    return Check(
        "stray_messages",
        "fail",
        f"messages wait in queues no worker consumes ({'; '.join(parts)}): send them with queue=<CHECK365_QUEUE>",
    )


def _pool_checks(settings: Settings, client: redis.Redis) -> list[Check]:
    from worker.ops.pool import PoolReader
    from worker.state.beats import overlapping, recent_beats

    state = PoolReader(client).read()
    window = BEAT_SILENT_SWEEPS * settings.sweep_interval_s
    beats = recent_beats(client, state.now, window)
    checks = []
    if not beats:
        last = "never" if state.last_sweep is None else f"{state.now - state.last_sweep:.0f} s ago"
        checks.append(
            Check(
                "beat",
                "fail",
                f"no sweep in the last {window:g} s (last: {last}): beat is down, or no worker runs its sweeps",
            )
        )
    elif len(both := overlapping(beats, settings.sweep_interval_s)) > 1:
        checks.append(
            Check(
                "beat",
                "fail",
                f"{len(both)} beats send sweeps ({', '.join(b.origin for b in both)}): run exactly one",
            )
        )
    else:
        checks.append(
            Check("beat", "ok", f"one beat ({beats[0].origin}), last sweep {state.now - beats[0].last:.0f} s ago")
        )
    late = settings.rearm_grace_s + 2 * settings.sweep_interval_s
    oldest = max(state.watches_overdue.oldest_age_s, state.events_overdue.oldest_age_s)
    checks.append(
        Check(
            "backlog",
            "warn" if oldest > late else "ok",
            f"{state.watches_overdue.count} poll(s) and {state.events_overdue.count} delivery attempt(s) overdue, "
            f"the oldest by {oldest:.0f} s; {state.watches_active} watch(es) active, "
            f"{state.events_pending.count} event(s) pending",
        )
    )
    if state.dead_letters:
        checks.append(
            Check(
                "dead_letters",
                "warn",
                f"{state.dead_letters} dead letter(s) wait for a replay (check365-worker dead-letters list)",
            )
        )
    else:
        checks.append(Check("dead_letters", "ok", "none"))
    if "key_refused" in state.pauses:
        checks.append(
            Check("pause", "fail", f"Check365 has refused the API key for {state.pauses['key_refused']:.0f} s")
        )
    elif "retry_after" in state.pauses:
        checks.append(
            Check("pause", "warn", f"Check365 asked to wait: requests resume in {state.pauses['retry_after']:.0f} s")
        )
    return checks


def _check365_check(settings: Settings) -> Check:
    from worker.polling.check365 import fetch_status, make_client

    client = make_client(settings)
    try:
        # A job id that cannot exist: Check365's own not-found answer proves the key is
        # accepted (any other 404 is classified as not Check365's).
        fetch_status(client, settings, "check365-worker-doctor-probe")
    except Check365Rejected as exc:
        if exc.reason == "unauthorized":
            return Check("check365", "fail", "the API key is refused")
        return Check("check365", "ok", f"endpoint answers, key accepted ({exc.reason} for a probe job)")
    except Check365Misconfigured as exc:
        return Check("check365", "fail", f"not Check365: {exc}")
    except RetryableError as exc:
        return Check("check365", "fail", f"endpoint unavailable: {exc}")
    finally:
        client.close()
    return Check("check365", "ok", "endpoint answers, key accepted")


def collect_checks(settings: Settings | None = None) -> list[Check]:
    if settings is None:
        checks, settings = _settings_checks()
        if settings is None:
            return checks
    else:
        checks = []
    from worker.runtime.context import redis_client

    client = redis_client(settings)
    try:
        redis_checks = _redis_checks(client)
        checks.extend(redis_checks)
        if all(c.name != "redis" or c.ok for c in redis_checks):
            stages: list[Callable[[], list[Check]]] = [
                lambda: _worker_checks(settings, client),
                lambda: _pool_checks(settings, client),
            ]
            for stage in stages:
                checks.extend(_guarded(stage))
    finally:
        client.close()
    checks.append(_check365_check(settings))
    return checks


def _guarded(stage: Callable[[], list[Check]]) -> list[Check]:
    try:
        return stage()
    except redis.RedisError as exc:
        return [Check("redis", "fail", f"lost during the checks: {type(exc).__name__}")]


def run_doctor(*, as_json: bool = False) -> int:
    checks = collect_checks()
    ok = all(c.ok for c in checks)
    if as_json:
        report: dict[str, Any] = {
            "ok": ok,
            "checks": [{"name": c.name, "status": c.status, "ok": c.ok, "detail": c.detail} for c in checks],
        }
        print(json.dumps(report, indent=2))
    else:
        labels = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}
        for c in checks:
            print(f"[{labels[c.status]}] {c.name}: {c.detail}")
    return 0 if ok else 1
