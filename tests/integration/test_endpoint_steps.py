"""Per-endpoint isolation in the step functions, against a real Redis with a fake clock:
the cap on attempts in flight, the breaker, the waiting line, unfinished attempts."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from tests.integration.test_steps import CALLBACK, World, end_lease_on_redis, redis_server, status
from worker.delivery.limits import retry_span_s
from worker.delivery.step import DeadLettered, Delivered, Held, RetryLater, deliver_claimed, deliver_once
from worker.delivery.urls import endpoint_key
from worker.local.redisserver import LocalRedis
from worker.polling.step import Finished, poll_once
from worker.runtime.context import WebhookClients
from worker.runtime.leases import watch_lease_s
from worker.runtime.sweep import sweep
from worker.state.outbox import StoredEvent
from worker.state.store import Dropped, Lease

pytestmark = pytest.mark.integration

__all__ = ["redis_server"]  # the module's Redis, shared with test_steps' fixture

ENDPOINT = endpoint_key(CALLBACK)
SETTINGS = {
    "WEBHOOK_ENDPOINT_MAX_IN_FLIGHT": "2",
    "WEBHOOK_BREAKER_THRESHOLD": "3",
    "WEBHOOK_BREAKER_COOLDOWN_S": "10",
    "WEBHOOK_RETRY_DELAYS_S": "5,300,1800",
}


class Killed(BaseException):
    """Stands for the pool's hard time limit: the step stops inside its attempt and settles nothing."""


@pytest.fixture
def world(redis_server: LocalRedis) -> Iterator[World]:
    w = World(redis_server.url, **SETTINGS)
    yield w
    w.ctx.close()


def finished(world: World, job_id: str) -> tuple[StoredEvent, bytes, str]:
    """A watch whose first poll finds its job failed: one event, held by the step that finished it."""
    step = world.start(job_id)
    answer_for_job = json.loads(status("failed", 50).content)
    answer_for_job["data"]["jobId"] = job_id
    world.check365_answers.append(httpx.Response(200, json=answer_for_job))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Finished)
    assert result.leased is not None
    event, body, _ = result.leased
    return event, body, result.deliveries[0][1]


def answer(world: World, handler: httpx.MockTransport) -> None:
    world.ctx.webhooks = WebhookClients(world.settings, transport=handler)


def breaker(world: World) -> dict[str, str]:
    raw = world.ctx.redis.hgetall(f"check365:endpoint:{ENDPOINT}")
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_the_endpoint_key_is_scheme_host_and_port_without_path_or_default_port() -> None:
    assert ENDPOINT == "https://hooks.example.com"
    assert endpoint_key("https://Hooks.Example.com:443/a?token=s3cret") == "https://hooks.example.com"
    assert endpoint_key("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"
    assert endpoint_key("https://[2001:db8::1]:8443/x") == "https://[2001:db8::1]:8443"
    assert endpoint_key("https://hooks.example.com./x") == "https://hooks.example.com"
    assert endpoint_key("not a url") == "invalid"


def test_the_cap_holds_attempts_in_flight_and_a_finished_attempt_hands_its_slot_on(world: World) -> None:
    events = [finished(world, f"J-{n}") for n in range(3)]
    results: list[object] = []

    # Each attempt, while in flight, starts the next one: three attempts at once, cap 2.
    def nested(request: httpx.Request) -> httpx.Response:
        index = len(results)
        if index < 2:
            results.append(None)
            results[index] = deliver_claimed(world.ctx, *events[index + 1])
        return httpx.Response(200)

    answer(world, httpx.MockTransport(nested))
    first = deliver_claimed(world.ctx, *events[0])
    second, third = results
    assert isinstance(third, Held)
    assert third.reason == "cap"
    assert isinstance(second, Delivered)
    # The second attempt's end handed its slot to the waiting third event.
    assert [r.webhook_id for r in second.wake] == [events[2][0].webhook_id]
    assert isinstance(first, Delivered)
    # Parked: no message, no slot; due at its deadline, and it kept its tries.
    parked = world.ctx.outbox.get(events[2][0].webhook_id)
    assert parked is not None
    assert parked.tries == 0
    # Let out of the line: its message is on its way, and a slot is kept for it until it comes.
    assert world.ctx.redis.hget(f"check365:event:{parked.webhook_id}", "armed") == b"1"
    inflight = world.ctx.redis.zrange(f"check365:endpoint_inflight:{ENDPOINT}", 0, -1)
    assert inflight == [f"r:{parked.webhook_id}".encode()]
    (released,) = second.wake
    assert isinstance(deliver_once(world.ctx, released.webhook_id, released.token), Delivered)


def test_the_breaker_opens_after_consecutive_failures_and_holds_events_without_spending_retries(
    world: World,
) -> None:
    events = [finished(world, f"J-{n}") for n in range(5)]
    answer(world, httpx.MockTransport(lambda request: httpx.Response(503)))
    with capture_logs() as logs:
        for event, body, holder in events[:3]:
            assert isinstance(deliver_claimed(world.ctx, event, body, holder), RetryLater)
    opened = [entry for entry in logs if entry["event"] == "breaker_opened"]
    assert len(opened) == 1
    assert opened[0]["endpoint"] == ENDPOINT
    assert opened[0]["consecutive_failures"] == 3
    assert breaker(world)["state"] == "open"

    sent = len(world.receiver_requests)
    event, body, holder = events[3]
    result = deliver_claimed(world.ctx, event, body, holder)
    assert result == Held(event.webhook_id, "breaker_open")
    assert len(world.receiver_requests) == sent  # not attempted
    stored = world.ctx.outbox.get(event.webhook_id)
    assert stored is not None
    assert (stored.tries, stored.state) == (0, "active")
    # Parked: due at its deadline, with no message on its way (the sweep wakes it then).
    assert stored.due == pytest.approx(event.created_at + retry_span_s(world.settings))
    assert world.ctx.redis.hget(f"check365:event:{event.webhook_id}", "armed") == b"0"
    assert [a.get("held") for a in stored.attempts] == ["breaker_open"]
    assert "503" in stored.attempts[0]["error"]


def test_one_probe_after_a_growing_cooldown_then_a_success_closes_and_drains_at_the_cap(world: World) -> None:
    events = [finished(world, f"J-{n}") for n in range(6)]
    answer(world, httpx.MockTransport(lambda request: httpx.Response(503)))
    for event, body, holder in events[:3]:
        deliver_claimed(world.ctx, event, body, holder)
    for event, body, holder in events[3:]:
        assert isinstance(deliver_claimed(world.ctx, event, body, holder), Held)

    # Before the cool-down nothing is let through; after it, exactly one probe.
    world.clock.advance(9)
    assert sweep(world.ctx)[1] == []
    world.clock.advance(1)
    _, released = sweep(world.ctx)
    assert [r.webhook_id for r in released] == [events[3][0].webhook_id]  # the oldest waiting
    assert sweep(world.ctx)[1] == []  # one probe at a time
    with capture_logs() as logs:
        probe = deliver_once(world.ctx, released[0].webhook_id, released[0].token)
    assert isinstance(probe, RetryLater)
    [reopened] = [entry for entry in logs if entry["event"] == "breaker_opened"]
    assert reopened["reopened"] is True
    assert reopened["cooldown_s"] == 20  # doubled

    world.clock.advance(19)
    assert sweep(world.ctx)[1] == []
    world.clock.advance(1)
    _, released = sweep(world.ctx)
    assert [r.webhook_id for r in released] == [events[4][0].webhook_id]
    answer(world, httpx.MockTransport(lambda request: httpx.Response(200)))
    with capture_logs() as logs:
        closed = deliver_once(world.ctx, released[0].webhook_id, released[0].token)
    assert isinstance(closed, Delivered)
    assert [entry["event"] for entry in logs if entry["event"].startswith("breaker_")] == ["breaker_closed"]
    assert breaker(world)["state"] == "closed"
    # The backlog drains at the cap: the closing attempt lets the next waiting event through.
    assert [r.webhook_id for r in closed.wake] == [events[5][0].webhook_id]
    stored = world.ctx.outbox.get(events[4][0].webhook_id)
    assert stored is not None
    assert [(a.get("held"), a.get("probe")) for a in stored.attempts] == [("breaker_open", None), (None, True)]


def test_an_event_held_past_its_retry_span_is_dead_lettered_with_the_breakers_history(
    redis_server: LocalRedis,
) -> None:
    # A cool-down longer than the whole schedule: no probe comes before the event's deadline.
    world = World(redis_server.url, **{**SETTINGS, "WEBHOOK_BREAKER_COOLDOWN_S": "100000"})
    try:
        events = [finished(world, f"J-{n}") for n in range(4)]
        answer(world, httpx.MockTransport(lambda request: httpx.Response(500)))
        for event, body, holder in events[:3]:
            deliver_claimed(world.ctx, event, body, holder)
        waiting = events[3][0]
        assert isinstance(deliver_claimed(world.ctx, *events[3]), Held)
        span = retry_span_s(world.settings)
        world.clock.advance(span - 1)
        assert waiting.webhook_id not in [r.webhook_id for r in sweep(world.ctx)[1]]
        world.clock.advance(2)
        [rearmed] = [r for r in sweep(world.ctx)[1] if r.webhook_id == waiting.webhook_id]
        result = deliver_once(world.ctx, rearmed.webhook_id, rearmed.token)
        assert isinstance(result, DeadLettered)
        stored = world.ctx.outbox.get(waiting.webhook_id)
        assert stored is not None
        assert (stored.state, stored.tries) == ("dead", 0)
        assert result.reason == stored.last_error
        assert result.reason.startswith(f"held past the retry schedule ({span:g} s): breaker open after 3")
        assert [a["held"] for a in stored.attempts] == ["breaker_open", "expired"]
        assert stored.attempts[1]["consecutive_failures"] == 3
        assert world.ctx.redis.zscore("check365:dead", waiting.webhook_id) is not None
        assert world.ctx.redis.zscore(f"check365:endpoint_backlog:{ENDPOINT}", waiting.webhook_id) is None
    finally:
        world.ctx.close()


def test_an_attempt_that_never_returned_counts_as_a_timeout_for_backoff_breaker_and_dead_letters(
    world: World,
) -> None:
    event, body, holder = finished(world, "J-kill")

    def killed(request: httpx.Request) -> httpx.Response:
        raise Killed

    answer(world, httpx.MockTransport(killed))
    result: object = None
    for tries in range(1, len(world.settings.webhook_retry_delays_s) + 2):
        with pytest.raises(Killed):
            deliver_claimed(world.ctx, event, body, holder)
        # While its lease runs the killed step's slot stays taken.
        assert world.ctx.redis.zcard(f"check365:endpoint_inflight:{ENDPOINT}") == 1
        world.clock.advance(watch_lease_s(world.settings) + 1)
        end_lease_on_redis(world, world.ctx.outbox.items.key(event.webhook_id))
        (rearmed,) = sweep(world.ctx)[1]
        claimed = world.ctx.outbox.claim(rearmed.webhook_id, rearmed.token, Lease.starting(world.clock(), 60))
        assert claimed is not None
        stored, _, holder = claimed
        result = deliver_claimed(world.ctx, stored, body, holder)
        if isinstance(result, DeadLettered):
            break
        assert isinstance(result, RetryLater)
        assert result.delay >= world.settings.webhook_retry_delays_s[tries - 1]
        world.clock.advance(result.delay)
        claimed = world.ctx.outbox.claim(event.webhook_id, result.token, Lease.starting(world.clock(), 60))
        assert claimed is not None
        event, body, holder = claimed
    assert isinstance(result, DeadLettered)
    assert result.reason == "retries exhausted: timeout (the attempt never returned)"
    dead = world.ctx.outbox.get(event.webhook_id)
    assert dead is not None
    assert [a["error"] for a in dead.attempts] == ["timeout (the attempt never returned)"] * 4
    assert [a["attempt"] for a in dead.attempts] == [1, 2, 3, 4]
    assert int(breaker(world)["failures"]) == 4
    assert world.ctx.redis.zcard(f"check365:endpoint_inflight:{ENDPOINT}") == 0


def test_a_step_that_lost_its_hold_before_the_gate_makes_no_attempt(world: World) -> None:
    event, body, holder = finished(world, "J-lost")
    world.ctx.redis.hset(f"check365:event:{event.webhook_id}", "token", "re-armed")
    assert deliver_claimed(world.ctx, event, body, holder) == Dropped("lost_claim", event.webhook_id)
    assert world.receiver_requests == []


def test_each_endpoint_is_seen_from_outside_in_the_cli_and_the_metrics(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import generate_latest

    from tests.support.cluster import cli_command
    from worker.ops.metrics import make_registry

    events = [finished(world, f"J-{n}") for n in range(4)]
    answer(world, httpx.MockTransport(lambda request: httpx.Response(503)))
    for event, body, holder in events[:3]:
        deliver_claimed(world.ctx, event, body, holder)
    assert isinstance(deliver_claimed(world.ctx, *events[3]), Held)

    env = {
        "PATH": os.environ.get("PATH", ""),
        "REDIS_URL": world.settings.redis_url,
        "WEBHOOK_BREAKER_THRESHOLD": "3",
        "WEBHOOK_ENDPOINT_MAX_IN_FLIGHT": "2",
    }
    shown = subprocess.run(
        [*cli_command(), "endpoints", "--json"], env=env, capture_output=True, text=True, check=True, timeout=30
    )
    [row] = json.loads(shown.stdout)
    assert row["endpoint"] == ENDPOINT
    assert (row["breaker"], row["consecutive_failures"], row["breaker_threshold"]) == ("open", 3, 3)
    assert (row["in_flight"], row["max_in_flight"], row["waiting"], row["backlog"]) == (0, 2, 1, 4)
    assert row["last_error"] == "HTTP 503"
    assert row["next_probe"] is not None
    text = subprocess.run(
        [*cli_command(), "endpoints"], env=env, capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert f"{ENDPOINT}  breaker open (3/3)  in flight 0/2  waiting 1  backlog 4" in text
    # Never a path, a query or a secret: only the endpoint's scheme, host and port.
    assert "/check365" not in shown.stdout + text

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # what a worker's endpoint serves from
    scraped = generate_latest(make_registry(world.settings.redis_url)).decode()
    label = f'{{endpoint="{ENDPOINT}"}}'
    assert f"check365_endpoint_breaker_state{label} 2.0" in scraped
    assert f"check365_endpoint_backlog{label} 4.0" in scraped
    assert f"check365_endpoint_in_flight{label} 0.0" in scraped
    assert f"check365_endpoint_oldest_pending_age_seconds{label}" in scraped
