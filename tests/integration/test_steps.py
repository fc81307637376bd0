"""The plain step functions against a real Redis, with Check365 and the receiver
injected as httpx.MockTransport and time as a fake clock: no Celery involved."""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from check365_client.rules import WatchRequest
from tests.support.settings import make_settings as settings_for
from worker.delivery.events import completed_events
from worker.delivery.step import UNFINISHED, DeadLettered, Delivered, RetryLater, deliver_claimed, deliver_once
from worker.local.redisserver import LocalRedis
from worker.local.simulator import generate_results
from worker.polling.ratelimit import BLOCKED_KEY
from worker.polling.schedule import SHORT_RESULTS_WAIT_S
from worker.polling.step import Finished, Reschedule, poll_once, start_watch
from worker.runtime.context import Context, WebhookClients, build_context
from worker.runtime.leases import watch_lease_s
from worker.runtime.sweep import sweep
from worker.settings import Settings
from worker.state.outbox import STAGED_BODY_TTL_S
from worker.state.store import Dropped, Lease
from worker.state.watches import INLINE_BODIES_BYTES

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"s" * 24).decode()
API_KEY = "step-test-key"
CALLBACK = "https://hooks.example.com/check365"
ENDPOINT = "https://hooks.example.com"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


def make_settings(redis_url: str, **overrides: str) -> Settings:
    env = {
        "CHECK365_API_KEY": API_KEY,
        "WEBHOOK_SECRET": SECRET,
        "CHECK365_BASE_URL": "https://api.check365.test",
        "REDIS_URL": redis_url,
        "POLL_INITIAL_DELAY_S": "5",
        "POLL_MAX_DELAY_S": "60",
        "WATCH_TIMEOUT_S": "3600",
        "WEBHOOK_RETRY_DELAYS_S": "5,300,1800",
        "WEBHOOK_MAX_RESULTS_PER_PART": "2",
        # No step here waits on the pool-wide rate limit (its clock is Redis's, not this world's):
        # at 1,000 requests a second, three polls within 2 ms were once told to wait.
        "CHECK365_MAX_RPS": "100000",
        **overrides,
    }
    return settings_for(env)


Handler = Callable[[httpx.Request], httpx.Response]


class World:
    """One context with scripted Check365 answers and a recording receiver."""

    def __init__(self, redis_url: str, **overrides: str) -> None:
        self.clock = Clock()
        self.check365_answers: list[httpx.Response] = []
        self.receiver_answers: list[httpx.Response] = []
        self.check365_requests: list[httpx.Request] = []
        self.receiver_requests: list[httpx.Request] = []
        self.settings = make_settings(redis_url, **overrides)
        self.ctx: Context = build_context(
            self.settings,
            check365_transport=httpx.MockTransport(self._check365),
            webhook_transport=httpx.MockTransport(self._receiver),
            clock=self.clock,
            resolver=lambda host, port: ["93.184.216.34"],
            rng=random.Random(7),
        )
        self.ctx.redis.flushdb()

    def _check365(self, request: httpx.Request) -> httpx.Response:
        self.check365_requests.append(request)
        return self.check365_answers.pop(0)

    def _receiver(self, request: httpx.Request) -> httpx.Response:
        self.receiver_requests.append(request)
        return self.receiver_answers.pop(0) if self.receiver_answers else httpx.Response(200)

    def start(self, job_id: str = "J-1", metadata: dict[str, Any] | None = None) -> Reschedule:
        result = start_watch(self.ctx, WatchRequest(job_id, CALLBACK, metadata))
        assert isinstance(result, Reschedule)
        return result


def status(
    state: str, progress: int = 0, results: list[dict[str, Any]] | None = None, total: int = 3
) -> httpx.Response:
    data: dict[str, Any] = {
        "jobId": "J-1",
        "status": state,
        "creditsUsed": 1,
        "progress": progress,
        "total": total,
        "results": results or [],
    }
    return httpx.Response(200, json={"success": True, "message": "ok", "data": data})


RESULTS = [
    {
        "email": f"u{i}@company.com",
        "emailProvider": "google_workspace",
        "emailType": "professional",
        "status": "valid",
        "safeToSend": True,
        "risk": "low",
        "isRole": False,
        "statusReason": "accepted_email",
    }
    for i in range(3)
]


@pytest.fixture
def world(redis_server: LocalRedis) -> Iterator[World]:
    w = World(redis_server.url)
    yield w
    w.ctx.close()


def test_duplicate_start_converges_on_one_watch(world: World) -> None:
    first = world.start()
    second = start_watch(world.ctx, WatchRequest("J-1", CALLBACK, None))
    assert isinstance(second, Dropped)
    assert second.reason == "duplicate"
    assert second.item_id == first.watch_id
    # Another callback for the same job is another watch.
    other = start_watch(world.ctx, WatchRequest("J-1", CALLBACK + "/b", None))
    assert isinstance(other, Reschedule)
    assert other.watch_id != first.watch_id


def test_running_polls_reschedule_within_bounds_and_record_state(world: World) -> None:
    step = world.start()
    assert step.delay == 5
    world.clock.advance(step.delay)
    world.check365_answers.append(status("processing", 10))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Reschedule)
    assert 0 < result.delay <= world.settings.poll_max_delay_s
    request = world.check365_requests[0]
    assert request.url.params["job_id"] == "J-1"
    assert request.url.params["api_key"] == API_KEY
    watch = world.ctx.watches.get(step.watch_id)
    assert watch is not None
    assert (watch.polls, watch.last_status, watch.last_progress) == (1, "processing", 10.0)
    # The message that was just consumed can never run again.
    assert isinstance(poll_once(world.ctx, step.watch_id, step.token), Dropped)


def test_completion_splits_results_into_parts_with_metadata(world: World) -> None:
    step = world.start(metadata={"order": 17})
    world.check365_answers.append(status("completed", 100, RESULTS))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Finished)
    assert result.outcome == "completed"
    assert len(result.deliveries) == 2  # 3 results, 2 per part
    bodies = [json.loads(world.ctx.outbox.body(wid) or b"") for wid, _ in result.deliveries]
    assert [b["data"]["part"] for b in bodies] == [{"index": 1, "count": 2}, {"index": 2, "count": 2}]
    assert [r for b in bodies for r in b["data"]["results"]] == RESULTS
    assert all(b["data"]["metadata"] == {"order": 17} for b in bodies)
    assert all(b["data"]["creditsUsed"] == 1 and b["data"]["total"] == 3 for b in bodies)
    watch = world.ctx.watches.get(step.watch_id)
    assert watch is not None
    assert (watch.state, watch.outcome) == ("finished", "completed")


def test_completed_with_missing_results_is_polled_again_shortly(world: World) -> None:
    step = world.start()
    world.check365_answers.append(status("completed", 100, RESULTS[:2]))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Reschedule)
    assert result.delay <= world.settings.poll_initial_delay_s


def test_unknown_job_fails_the_watch_with_job_not_found(world: World) -> None:
    step = world.start()
    world.check365_answers.append(httpx.Response(404, json={"success": False, "message": "Job not found"}))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Finished)
    assert result.outcome == "failed"
    body = json.loads(world.ctx.outbox.body(result.deliveries[0][0]) or b"")
    assert body["type"] == "bulk_validation.failed"
    assert body["data"]["reason"] == "job_not_found"


def test_retry_after_blocks_the_whole_pool(world: World) -> None:
    step = world.start()
    world.check365_answers.append(httpx.Response(429, headers={"Retry-After": "30"}))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Reschedule)
    assert result.delay >= 30
    assert world.ctx.redis.exists(BLOCKED_KEY)
    # Any other watch is now held back without a request.
    other = world.start("J-2")
    held = poll_once(world.ctx, other.watch_id, other.token)
    assert isinstance(held, Reschedule)
    assert len(world.check365_requests) == 1


def test_deadline_ends_the_watch_after_one_more_poll_with_its_status(world: World) -> None:
    step = world.start()
    world.check365_answers.append(status("processing", 40))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Reschedule)
    world.clock.advance(world.settings.watch_timeout_s + 1)
    world.check365_answers.append(status("processing", 45))
    final = poll_once(world.ctx, step.watch_id, result.token)
    assert isinstance(final, Finished)
    assert final.outcome == "timed_out"
    assert len(world.check365_requests) == 2, "no watch times out without a poll at or after its deadline"
    body = json.loads(world.ctx.outbox.body(final.deliveries[0][0]) or b"")
    assert body["data"] == {
        "jobId": "J-1",
        "reason": "timed_out",
        "status": "processing",
        "progress": 45,
        "metadata": None,
    }


def test_a_watch_throttled_past_its_deadline_is_polled_at_its_turn_and_completes(world: World) -> None:
    step = world.start()
    world.clock.advance(world.settings.watch_timeout_s + 1)
    # The pool is held back (a crowd's turns, a Retry-After): the watch waits for its
    # turn, however far past its deadline, and does not time out unseen.
    world.ctx.limiter.block(30)
    held = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(held, Reschedule)
    assert 29 <= held.delay <= 30
    assert world.check365_requests == []
    world.ctx.redis.delete(BLOCKED_KEY)
    world.clock.advance(held.delay)
    world.check365_answers.append(status("completed", 100, RESULTS))
    done = poll_once(world.ctx, step.watch_id, held.token)
    assert isinstance(done, Finished)
    assert done.outcome == "completed"


def test_a_failed_poll_at_the_deadline_ends_the_watch(world: World) -> None:
    step = world.start()
    world.clock.advance(world.settings.watch_timeout_s)
    world.check365_answers.append(httpx.Response(503))
    final = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(final, Finished)
    assert final.outcome == "timed_out"
    watch = world.ctx.watches.get(step.watch_id)
    assert watch is not None and watch.polls == 1


def finished_by_failure(world: World) -> Finished:
    """A watch whose first poll finds its job failed: one event."""
    step = world.start()
    world.check365_answers.append(status("failed", 50))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Finished)
    return result


def finish_one(world: World) -> tuple[str, str]:
    return finished_by_failure(world).deliveries[0]


def test_delivery_is_signed_verifiable_and_marked_delivered(world: World) -> None:
    webhook_id, token = finish_one(world)
    assert isinstance(deliver_once(world.ctx, webhook_id, token), Delivered)
    sent = world.receiver_requests[0]
    # The connection goes to the checked address; the Host header keeps the name.
    assert sent.url.host == "93.184.216.34"
    assert sent.headers["host"] == "hooks.example.com"
    assert sent.headers["webhook-id"] == webhook_id
    assert sent.content == world.ctx.outbox.body(webhook_id)
    assert sent.headers["user-agent"].startswith("check365-worker/")
    # standardwebhooks' verify() checks freshness against the real clock, and this
    # clock is fake: compare with its own signature for the same timestamp instead.
    stamp = datetime.fromtimestamp(int(sent.headers["webhook-timestamp"]), tz=UTC)
    assert sent.headers["webhook-signature"] == Webhook(SECRET).sign(webhook_id, stamp, sent.content.decode())
    event = world.ctx.outbox.get(webhook_id)
    assert event is not None
    assert event.state == "delivered"


def test_failed_attempts_retry_with_the_same_id_and_fresh_timestamps(world: World) -> None:
    webhook_id, token = finish_one(world)
    world.receiver_answers += [httpx.Response(503), httpx.Response(200)]
    first = deliver_once(world.ctx, webhook_id, token)
    assert isinstance(first, RetryLater)
    assert 5 <= first.delay <= 5.5
    assert first.countdown
    world.clock.advance(first.delay)
    assert isinstance(deliver_once(world.ctx, webhook_id, first.token), Delivered)
    a, b = world.receiver_requests
    assert a.headers["webhook-id"] == b.headers["webhook-id"] == webhook_id
    assert int(b.headers["webhook-timestamp"]) > int(a.headers["webhook-timestamp"])
    event = world.ctx.outbox.get(webhook_id)
    assert event is not None
    assert [x["status_code"] for x in event.attempts] == [503, 200]


def test_retry_after_from_the_receiver_is_honoured(world: World) -> None:
    webhook_id, token = finish_one(world)
    world.receiver_answers.append(httpx.Response(503, headers={"Retry-After": "120"}))
    result = deliver_once(world.ctx, webhook_id, token)
    assert isinstance(result, RetryLater)
    assert result.delay >= 120


def test_long_delays_wait_for_the_sweep_not_in_the_broker(world: World) -> None:
    webhook_id, token = finish_one(world)
    world.receiver_answers += [httpx.Response(500), httpx.Response(500)]
    first = deliver_once(world.ctx, webhook_id, token)
    assert isinstance(first, RetryLater)
    world.clock.advance(first.delay)
    second = deliver_once(world.ctx, webhook_id, first.token)
    assert isinstance(second, RetryLater)
    assert second.delay >= 300
    assert not second.countdown  # longer than POLL_MAX_DELAY_S: no countdown message
    _, events = sweep(world.ctx)
    assert events == []  # not due yet
    world.clock.advance(second.delay)
    _, events = sweep(world.ctx)
    assert [e.webhook_id for e in events] == [webhook_id]
    # The sweep's fresh token replaces the one the retry was scheduled with.
    assert isinstance(deliver_once(world.ctx, webhook_id, second.token), Dropped)
    assert isinstance(deliver_once(world.ctx, webhook_id, events[0].token), Delivered)


def test_gone_dead_letters_at_once_and_replay_keeps_the_id(world: World) -> None:
    webhook_id, token = finish_one(world)
    world.receiver_answers.append(httpx.Response(410))
    result = deliver_once(world.ctx, webhook_id, token)
    assert isinstance(result, DeadLettered)
    assert result.reason == "gone"
    assert world.ctx.outbox.dead_letters() == [webhook_id]
    replay_token = world.ctx.outbox.replay(webhook_id, world.clock())
    assert replay_token is not None
    assert isinstance(deliver_once(world.ctx, webhook_id, replay_token), Delivered)
    assert world.receiver_requests[-1].headers["webhook-id"] == webhook_id
    assert world.ctx.outbox.dead_letters() == []


def test_exhausted_retries_are_dead_lettered_with_every_attempt(world: World) -> None:
    webhook_id, token = finish_one(world)
    world.receiver_answers += [httpx.Response(500)] * 4
    result: Any = deliver_once(world.ctx, webhook_id, token)
    while isinstance(result, RetryLater):
        world.clock.advance(result.delay)
        if not result.countdown:
            _, events = sweep(world.ctx)
            result = deliver_once(world.ctx, webhook_id, events[0].token)
        else:
            result = deliver_once(world.ctx, webhook_id, result.token)
    assert isinstance(result, DeadLettered)
    event = world.ctx.outbox.get(webhook_id)
    assert event is not None
    assert event.state == "dead"
    assert len(event.attempts) == 1 + len(world.settings.webhook_retry_delays_s)


def test_a_callback_resolving_to_a_private_address_is_never_contacted(world: World) -> None:
    world.ctx.resolver = lambda host, port: ["10.0.0.8"]
    webhook_id, token = finish_one(world)
    result = deliver_once(world.ctx, webhook_id, token)
    assert isinstance(result, DeadLettered)
    assert "private" in result.reason
    assert world.receiver_requests == []


def test_sweep_rearms_a_poll_whose_message_was_lost(world: World) -> None:
    step = world.start()
    world.clock.advance(step.delay + world.settings.rearm_grace_s - 1)
    watches, _ = sweep(world.ctx)
    assert watches == []  # still within the grace of an armed countdown
    world.clock.advance(2)
    watches, _ = sweep(world.ctx)
    assert [w.watch.watch_id for w in watches] == [step.watch_id]
    # The lost original, should it reappear, is stale; the re-armed one runs.
    world.check365_answers.append(status("processing", 5))
    assert isinstance(poll_once(world.ctx, step.watch_id, step.token), Dropped)
    assert isinstance(poll_once(world.ctx, step.watch_id, watches[0].token), Reschedule)


# --- fewer round trips: steps that hand over what they hold --------------------------------------


def test_a_single_event_is_created_claimed_by_the_finishing_step_which_delivers_it(world: World) -> None:
    result = finished_by_failure(world)
    assert result.leased is not None
    event, body, _ = result.leased
    ((webhook_id, holder),) = result.deliveries
    assert event.webhook_id == webhook_id
    assert body == world.ctx.outbox.body(webhook_id)
    # Held by this step: no message exists, so the sweep waits for the lease to run out.
    stored = world.ctx.redis.hgetall(f"check365:event:{webhook_id}")
    assert stored[b"token"].decode() == holder
    assert stored[b"armed"] == b"0"
    # As long as the rest of the watch task may run: its hard time limit, and a margin.
    assert float(stored[b"due"]) == pytest.approx(world.clock() + watch_lease_s(world.settings))
    assert sweep(world.ctx) == ([], [])
    assert isinstance(deliver_claimed(world.ctx, event, body, holder), Delivered)
    assert world.receiver_requests[0].content == body
    stored_event = world.ctx.outbox.get(webhook_id)
    assert stored_event is not None
    assert stored_event.state == "delivered"
    assert [a["status_code"] for a in stored_event.attempts] == [200]


def end_lease_on_redis(world: World, key: str) -> None:
    """Let a lease run out on Redis's clock, which a fake clock cannot move."""
    assert world.ctx.redis.hexists(key, "lease_until")
    world.ctx.redis.hset(key, "lease_until", "0")


def test_a_finishing_step_that_dies_before_delivering_is_recovered_after_its_lease(world: World) -> None:
    result = finished_by_failure(world)
    assert result.leased is not None
    ((webhook_id, holder),) = result.deliveries
    world.clock.advance(watch_lease_s(world.settings) - 1)
    assert sweep(world.ctx) == ([], [])
    world.clock.advance(2)
    end_lease_on_redis(world, world.ctx.outbox.items.key(webhook_id))
    _, events = sweep(world.ctx)
    assert [e.webhook_id for e in events] == [webhook_id]
    # The dead step's hold is gone: were it still running, the endpoint's gate would not let
    # it make an attempt; the sweep's message delivers the event.
    event, body, _ = result.leased
    assert deliver_claimed(world.ctx, event, body, holder) == Dropped("lost_claim", webhook_id)
    assert world.ctx.outbox.get(webhook_id).state == "active"  # type: ignore[union-attr]
    assert isinstance(deliver_once(world.ctx, webhook_id, events[0].token), Delivered)
    stored_event = world.ctx.outbox.get(webhook_id)
    assert stored_event is not None
    assert stored_event.state == "delivered"
    assert len(world.receiver_requests) == 1
    assert [a["status_code"] for a in stored_event.attempts] == [200]


def _script_calls(world: World) -> int:
    """Scripts run by SHA, not counting those Redis did not have yet (the caller then loads and reruns them)."""
    stats = world.ctx.redis.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)) - int(stats.get("failed_calls", 0))


def test_where_the_step_delivers_at_once_its_first_attempt_passes_the_gate_in_the_finish(world: World) -> None:
    # As the worker's tasks run it: the finish and the gate are one script call, and the
    # attempt then costs its settlement alone.
    world.ctx = replace(world.ctx, gate_on_finish=True)
    step = world.start()
    world.check365_answers.append(status("failed", 50))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Finished) and result.leased is not None and result.admission is not None
    assert result.admission.verdict == "go"
    event, body, holder = result.leased
    # Passed: the attempt holds a slot and is recorded as started, before it is made.
    inflight = world.ctx.redis.zrange(f"check365:endpoint_inflight:{ENDPOINT}", 0, -1)
    assert inflight == [holder.encode()]
    started = world.ctx.redis.hget(f"check365:event:{event.webhook_id}", "started")
    assert json.loads(started or b"{}")["holder"] == holder
    before = _script_calls(world)
    assert isinstance(deliver_claimed(world.ctx, event, body, holder, result.admission), Delivered)
    assert _script_calls(world) - before == 1  # the settlement alone
    assert len(world.receiver_requests) == 1
    assert world.ctx.redis.zcard(f"check365:endpoint_inflight:{ENDPOINT}") == 0
    stored = world.ctx.outbox.get(event.webhook_id)
    assert stored is not None and stored.state == "delivered" and [a["status_code"] for a in stored.attempts] == [200]


def test_a_step_that_dies_after_a_finish_that_passed_the_gate_has_its_attempt_counted(world: World) -> None:
    # Between the finish and the request there is no telling whether it was sent: counted
    # as an attempt that never returned, as after any gate (see "Unfinished attempts").
    world.ctx = replace(world.ctx, gate_on_finish=True)
    result = finished_by_failure(world)
    assert result.admission is not None and result.admission.admitted
    ((webhook_id, _),) = result.deliveries
    world.clock.advance(watch_lease_s(world.settings) + 1)
    end_lease_on_redis(world, world.ctx.outbox.items.key(webhook_id))
    _, events = sweep(world.ctx)
    retry = deliver_once(world.ctx, webhook_id, events[0].token)
    assert isinstance(retry, RetryLater)
    assert world.receiver_requests == []
    stored = world.ctx.outbox.get(webhook_id)
    assert stored is not None
    assert [a["error"] for a in stored.attempts] == [UNFINISHED]
    world.clock.advance(retry.delay)
    assert isinstance(deliver_once(world.ctx, webhook_id, retry.token), Delivered)


def test_several_parts_are_left_to_their_messages(world: World) -> None:
    step = world.start()
    world.check365_answers.append(status("completed", 100, RESULTS))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Finished)
    assert result.leased is None
    for webhook_id, token in result.deliveries:
        assert world.ctx.redis.hget(f"check365:event:{webhook_id}", "armed") == b"1"
        assert isinstance(deliver_once(world.ctx, webhook_id, token), Delivered)


@pytest.fixture
def eager_world(redis_server: LocalRedis) -> Iterator[World]:
    w = World(redis_server.url, POLL_INITIAL_DELAY_S="0")
    yield w
    w.ctx.close()


def test_with_no_initial_delay_the_watch_is_created_claimed_and_polled_at_once(eager_world: World) -> None:
    world = eager_world
    world.check365_answers.append(status("processing", 10))
    result = start_watch(world.ctx, WatchRequest("J-1", CALLBACK, None))
    assert isinstance(result, Reschedule)
    assert len(world.check365_requests) == 1
    watch = world.ctx.watches.get(result.watch_id)
    assert watch is not None
    assert (watch.polls, watch.last_progress) == (1, 10.0)
    world.check365_answers.append(status("completed", 100, RESULTS))
    done = poll_once(world.ctx, result.watch_id, result.token)
    assert isinstance(done, Finished)
    assert done.outcome == "completed"


def test_a_watch_created_claimed_whose_step_dies_is_polled_after_its_lease(eager_world: World) -> None:
    world = eager_world
    created = world.ctx.watches.create(
        watch_id="w_dies",
        job_id="J-1",
        callback_url=CALLBACK,
        metadata=None,
        now=world.clock(),
        first_poll_at=world.clock(),
        deadline=world.clock() + 3600,
        lease=Lease.starting(world.clock(), 70),
    )
    assert created.token is not None
    assert created.watch is not None
    assert created.watch.state == "active"
    world.clock.advance(69)
    assert sweep(world.ctx) == ([], [])
    world.clock.advance(2)
    end_lease_on_redis(world, world.ctx.watches.items.key("w_dies"))
    watches, _ = sweep(world.ctx)
    assert [w.watch.watch_id for w in watches] == ["w_dies"]
    world.check365_answers.append(status("processing", 5))
    assert isinstance(poll_once(world.ctx, "w_dies", watches[0].token), Reschedule)


def test_an_attempt_is_recorded_even_when_its_step_lost_the_event(world: World) -> None:
    webhook_id, token = finish_one(world)
    claimed = world.ctx.outbox.claim(webhook_id, token, Lease.starting(world.clock(), 60))
    assert claimed is not None
    event, body, holder = claimed

    def taken_over_meanwhile(request: httpx.Request) -> httpx.Response:
        world.ctx.redis.hset(f"check365:event:{webhook_id}", "token", "re-armed")
        return httpx.Response(503)

    world.ctx.webhooks = WebhookClients(world.settings, transport=httpx.MockTransport(taken_over_meanwhile))
    assert deliver_claimed(world.ctx, event, body, holder) == Dropped("lost_claim", webhook_id)
    stored_event = world.ctx.outbox.get(webhook_id)
    assert stored_event is not None
    assert (stored_event.state, stored_event.tries) == ("active", 0)
    assert [a["status_code"] for a in stored_event.attempts] == [503]


# --- big answers: parts stored one by one, then created with the outcome -----------------------


def completed_body(results: list[dict[str, Any]]) -> bytes:
    data = {
        "jobId": "J-1",
        "status": "completed",
        "creditsUsed": len(results),
        "progress": 100,
        "total": len(results),
        "results": results,
    }
    return json.dumps({"success": True, "message": "Job has been completed", "data": data}).encode()


def streamed(chunks: Iterable[bytes]) -> httpx.Response:
    return httpx.Response(200, content=iter(chunks))


def keys(world: World, pattern: str) -> list[bytes]:
    return sorted(world.ctx.redis.scan_iter(f"check365:{pattern}"))


@pytest.fixture
def big_world(redis_server: LocalRedis) -> Iterator[World]:
    w = World(redis_server.url, WEBHOOK_MAX_RESULTS_PER_PART="500")
    yield w
    w.ctx.close()


BIG = generate_results("J-1", 2_000)  # about 400 KB: spooled, not parsed whole


def test_a_big_answer_is_stored_part_by_part(big_world: World) -> None:
    world = big_world
    step = world.start(metadata={"order": 17})
    body = completed_body(BIG)
    world.check365_answers.append(streamed(body[i : i + 65_536] for i in range(0, len(body), 65_536)))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Finished)
    assert len(result.deliveries) == 4
    bodies = [json.loads(world.ctx.outbox.body(wid) or b"") for wid, _ in result.deliveries]
    assert [b["data"]["part"] for b in bodies] == [{"index": i, "count": 4} for i in range(1, 5)]
    assert [r for b in bodies for r in b["data"]["results"]] == BIG
    assert all(b["data"]["metadata"] == {"order": 17} and b["data"]["total"] == 2_000 for b in bodies)
    # Moved into place and kept: no staged copy is left, no body expires.
    assert keys(world, "staged_body:*") == []
    assert all(world.ctx.redis.ttl(world.ctx.outbox.body_key(wid)) == -1 for wid, _ in result.deliveries)
    webhook_id, token = result.deliveries[2]
    assert isinstance(deliver_once(world.ctx, webhook_id, token), Delivered)
    assert world.receiver_requests[-1].content == world.ctx.outbox.body(webhook_id)


def test_a_poll_that_loses_its_claim_leaves_no_outcome_and_no_bodies(big_world: World) -> None:
    world = big_world
    step = world.start()

    def stolen_while_reading() -> Iterator[bytes]:
        # The sweep re-arms the watch (a new token) while this poll reads the answer.
        world.ctx.redis.hset(f"check365:watch:{step.watch_id}", "token", "re-armed")
        yield completed_body(BIG)

    world.check365_answers.append(streamed(stolen_while_reading()))
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert result == Dropped("lost_claim", step.watch_id)
    watch = world.ctx.watches.get(step.watch_id)
    assert watch is not None
    assert (watch.state, watch.outcome) == ("active", None)
    assert keys(world, "event:*") == keys(world, "event_body:*") == keys(world, "staged_body:*") == []


def test_finishing_needs_every_staged_body_and_writes_nothing_without(world: World) -> None:
    step = world.start()
    claimed = world.ctx.watches.claim(step.watch_id, step.token, Lease.starting(world.clock(), 60))
    assert claimed is not None
    watch, holder = claimed
    events = completed_events(
        step.watch_id,
        "J-1",
        {"status": "completed", "total": 3, "results": RESULTS},
        None,
        per_part=1,
        now=world.clock(),
    )
    world.ctx.outbox.stage_bodies(holder, [(e.webhook_id, e.body) for e in events])
    staged = world.ctx.outbox.staged_body_key(holder, events[1].webhook_id)
    assert 0 < world.ctx.redis.ttl(staged) <= STAGED_BODY_TTL_S  # strays expire on their own
    world.ctx.redis.delete(staged)
    heads = [e.head for e in events]
    finish = world.ctx.watches.finish
    assert finish(watch, holder, "completed", heads, outbox=world.ctx.outbox, now=world.clock()) is None
    # Nothing was written, and the other staged bodies were let go.
    assert keys(world, "event:*") == keys(world, "event_body:*") == keys(world, "staged_body:*") == []
    assert world.ctx.redis.zcard(world.ctx.outbox.items.due_key) == 0
    again = world.ctx.watches.get(step.watch_id)
    assert again is not None
    assert again.state == "active"
    # With every body staged, the same claim finishes.
    world.ctx.outbox.stage_bodies(holder, [(e.webhook_id, e.body) for e in events])
    deliveries = finish(watch, holder, "completed", heads, outbox=world.ctx.outbox, now=world.clock())
    assert deliveries is not None
    assert [wid for wid, _ in deliveries.tokens] == [e.webhook_id for e in events]
    assert [world.ctx.outbox.body(e.webhook_id) for e in events] == [e.body for e in events]
    assert keys(world, "staged_body:*") == []


def test_a_single_part_too_big_to_travel_with_the_outcome_is_staged_first(redis_server: LocalRedis) -> None:
    world = World(redis_server.url, WEBHOOK_MAX_RESULTS_PER_PART="5000")
    try:
        step = world.start()
        body = completed_body(BIG)
        world.check365_answers.append(streamed(body[i : i + 65_536] for i in range(0, len(body), 65_536)))
        result = poll_once(world.ctx, step.watch_id, step.token)
        assert isinstance(result, Finished)
        assert result.leased is not None
        event, sent_body, _ = result.leased
        assert len(sent_body) > INLINE_BODIES_BYTES
        assert world.ctx.outbox.body(event.webhook_id) == sent_body
        assert keys(world, "staged_body:*") == []
        assert world.ctx.redis.ttl(world.ctx.outbox.body_key(event.webhook_id)) == -1
        assert json.loads(sent_body)["data"]["results"] == BIG
        assert isinstance(deliver_claimed(world.ctx, event, sent_body, result.deliveries[0][1]), Delivered)
    finally:
        world.ctx.close()


def test_the_step_redis_client_packs_and_parses_with_hiredis(world: World) -> None:
    # The dependency is declared for speed alone: redis-py falls back to its pure
    # Python parser without a word when hiredis cannot be imported.
    world.ctx.redis.ping()
    connection = world.ctx.redis.connection_pool.get_connection()
    try:
        assert type(connection._parser).__name__ == "_HiredisParser"
    finally:
        world.ctx.redis.connection_pool.release(connection)


@pytest.fixture
def quick_world(redis_server: LocalRedis) -> Iterator[World]:
    w = World(redis_server.url, WEBHOOK_TIMEOUT_S="0.1")
    yield w
    w.ctx.close()


def endless_body(chunk: bytes, pause_s: float = 0.0) -> Iterator[bytes]:
    """A body that never ends: a chunk at a time, each well inside a read timeout."""
    while True:
        yield chunk
        time.sleep(pause_s)


@pytest.mark.parametrize(
    "content",
    [lambda: endless_body(b".", pause_s=0.02), lambda: endless_body(b"x" * 65536)],
    ids=["trickling-past-the-budget", "endless-and-fast"],
)
def test_the_receivers_status_is_its_answer_however_its_body_goes_on(
    quick_world: World, content: Callable[[], Iterator[bytes]]
) -> None:
    # The body is cut off at the attempt's budget (twice WEBHOOK_TIMEOUT_S) or at
    # 64 KiB, so the step never outlives its lease; the 2xx already acknowledged it.
    webhook_id, token = finish_one(quick_world)
    quick_world.receiver_answers.append(httpx.Response(200, content=content()))
    assert isinstance(deliver_once(quick_world.ctx, webhook_id, token), Delivered)
    event = quick_world.ctx.outbox.get(webhook_id)
    assert event is not None
    assert event.state == "delivered"


def test_a_failure_status_with_an_endless_body_is_still_a_failure(quick_world: World) -> None:
    webhook_id, token = finish_one(quick_world)
    quick_world.receiver_answers.append(httpx.Response(503, content=endless_body(b".", pause_s=0.02)))
    result = deliver_once(quick_world.ctx, webhook_id, token)
    assert isinstance(result, RetryLater)
    event = quick_world.ctx.outbox.get(webhook_id)
    assert event is not None
    assert [a["status_code"] for a in event.attempts] == [503]


def test_a_start_message_delivered_again_after_its_watch_ended_starts_nothing(eager_world: World) -> None:
    # The worker finished the watch in the start step, then died before acknowledging the
    # message: the broker delivers it again, and it must not start a second watch (whose
    # events would carry new webhook-ids the receiver could not recognise as repeats).
    world = eager_world
    request = WatchRequest("J-1", CALLBACK, None)
    world.check365_answers.append(status("failed", 50))
    first = start_watch(world.ctx, request, message_id="celery-task-7")
    assert isinstance(first, Finished)
    again = start_watch(world.ctx, request, message_id="celery-task-7")
    [watch_id] = world.ctx.redis.smembers("check365:job:J-1")
    assert again == Dropped("duplicate", watch_id.decode())
    assert len(world.check365_requests) == 1
    # A new enqueue of the same job, once its watch has ended, is a new watch.
    world.check365_answers.append(status("failed", 50))
    assert isinstance(start_watch(world.ctx, request, message_id="celery-task-8"), Finished)
    assert len(world.ctx.redis.smembers("check365:job:J-1")) == 2


def test_a_completed_job_short_of_its_total_is_delivered_as_it_is_after_a_minute(world: World) -> None:
    # Check365's own example answer: completed, "total": 2, one result.
    step = world.start()
    started = world.clock()
    token, watch_id, wait = step.token, step.watch_id, step.delay
    delays: list[float] = []  # after each poll that reached Check365 (the pool-wide limiter may defer one)
    for _ in range(60):
        world.clock.advance(wait)
        world.check365_answers[:] = [status("completed", 100, RESULTS[:1], total=2)]
        asked = len(world.check365_requests)
        result = poll_once(world.ctx, watch_id, token)
        if not isinstance(result, Reschedule):
            break
        token, wait = result.token, result.delay
        if len(world.check365_requests) > asked:
            delays.append(result.delay)
    assert isinstance(result, Finished)
    assert result.outcome == "completed"
    # Waited a minute, with growing gaps: about ten polls, not one every two seconds.
    assert delays == sorted(delays)
    assert sum(delays) >= SHORT_RESULTS_WAIT_S
    assert len(world.check365_requests) <= 12
    assert world.clock() - started < SHORT_RESULTS_WAIT_S + 30
    ((webhook_id, _),) = result.deliveries
    body = json.loads(world.ctx.outbox.body(webhook_id) or b"{}")
    assert (body["data"]["total"], len(body["data"]["results"])) == (2, 1)


def test_results_that_arrive_during_the_wait_are_delivered_whole(world: World) -> None:
    step = world.start()
    world.clock.advance(5)
    world.check365_answers.append(status("completed", 100, RESULTS[:2], total=3))
    short = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(short, Reschedule)
    world.clock.advance(short.delay)
    world.check365_answers.append(status("completed", 100, RESULTS, total=3))
    done = poll_once(world.ctx, step.watch_id, short.token)
    assert isinstance(done, Finished)
    bodies = [json.loads(world.ctx.outbox.body(webhook_id) or b"{}") for webhook_id, _ in done.deliveries]
    assert [r["email"] for b in bodies for r in b["data"]["results"]] == [r["email"] for r in RESULTS]


def test_a_watch_whose_callback_is_no_longer_allowed_ends_without_an_event(world: World) -> None:
    # Started while plain http was allowed; WEBHOOK_ALLOW_HTTP is off now.
    plain = "http://hooks.example.com/check365"
    step = start_watch(world.ctx, WatchRequest("J-1", plain, None))
    assert isinstance(step, Reschedule)
    result = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(result, Finished)
    assert (result.outcome, result.deliveries) == ("callback_refused", [])
    assert world.check365_requests == [], "no request for a watch that cannot be told the outcome"
    watch = world.ctx.watches.get(step.watch_id)
    assert watch is not None and (watch.state, watch.outcome) == ("finished", "callback_refused")
    # The pair is free again.
    assert isinstance(start_watch(world.ctx, WatchRequest("J-1", plain, None)), Reschedule)


def test_the_sweep_times_out_a_watch_whose_messages_never_run_past_its_deadline(world: World) -> None:
    step = world.start()
    world.check365_answers.append(status("processing", 30))
    polled = poll_once(world.ctx, step.watch_id, step.token)
    assert isinstance(polled, Reschedule)
    # Every message from now on is lost or refused: only the sweep sees the watch.
    world.clock.advance(world.settings.watch_timeout_s - 10)
    rearmed, _ = sweep(world.ctx)
    assert [r.watch.watch_id for r in rearmed] == [step.watch_id], "before the deadline, re-armed"
    world.clock.advance(10 + world.settings.rearm_grace_s + watch_lease_s(world.settings) + 1)
    rearmed, events = sweep(world.ctx)
    assert rearmed == []
    [event] = events
    body = json.loads(world.ctx.outbox.body(event.webhook_id) or b"")
    assert body["type"] == "bulk_validation.timed_out"
    assert (body["data"]["status"], body["data"]["progress"]) == ("processing", 30)
    watch = world.ctx.watches.get(step.watch_id)
    assert watch is not None and watch.outcome == "timed_out"
    assert isinstance(deliver_once(world.ctx, event.webhook_id, event.token), Delivered)


def test_a_cancel_that_a_finish_overtakes_leaves_the_finished_watch_and_its_event(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = world.start()
    store = world.ctx.watches
    read = store.get

    def read_then_finish(watch_id: str) -> Any:
        watch = read(watch_id)  # what cancel sees: an active watch
        # The job's outcome lands between cancel's read and its write.
        world.check365_answers.append(status("failed", 50))
        assert isinstance(poll_once(world.ctx, step.watch_id, step.token), Finished)
        return watch

    monkeypatch.setattr(store, "get", read_then_finish)
    assert store.cancel(step.watch_id) is False
    monkeypatch.undo()
    watch = store.get(step.watch_id)
    assert watch is not None
    assert (watch.state, watch.outcome) == ("finished", "failed")


def test_a_sweep_on_a_host_whose_clock_runs_ahead_cannot_take_a_running_steps_watch(world: World) -> None:
    step = world.start()
    claimed = world.ctx.watches.claim(step.watch_id, step.token, Lease.starting(world.clock(), 60))
    assert claimed is not None
    # The sweep runs on a host whose clock is ten minutes ahead of the step's: by that
    # clock the lease ran out long ago, by Redis's it has not.
    world.clock.advance(600)
    assert sweep(world.ctx) == ([], [])
    watch, holder = claimed
    assert world.ctx.watches.advance(watch.watch_id, holder, world.clock() + 5), "the step still holds it"


def test_a_sweep_on_a_host_whose_clock_runs_ahead_cannot_take_a_running_delivery(world: World) -> None:
    webhook_id, token = finish_one(world)
    claimed = world.ctx.outbox.claim(webhook_id, token, Lease.starting(world.clock(), 45))
    assert claimed is not None
    world.clock.advance(600)
    assert sweep(world.ctx) == ([], [])
    end_lease_on_redis(world, world.ctx.outbox.items.key(webhook_id))
    _, events = sweep(world.ctx)
    assert [e.webhook_id for e in events] == [webhook_id]
