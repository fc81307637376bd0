"""The pool-wide state behind the gauges, /readyz and doctor, read from a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from worker.local.redisserver import LocalRedis
from worker.ops.pool import PoolReader
from worker.polling.ratelimit import BLOCKED_KEY, KEY_REFUSED_KEY, TURNS_KEY
from worker.state.beats import last_sweep, overlapping, recent_beats, record_sweep
from worker.state.outbox import DEAD_KEY
from worker.state.store import PREFIX
from worker.state.watches import WatchStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRedis]:
    with LocalRedis() as started:
        yield started


@pytest.fixture
def client(server: LocalRedis) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(server.url)
    connection.flushall()
    yield connection
    connection.close()


def redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds + micros / 1e6)


def test_an_empty_pool_reads_as_zeros(client: redis.Redis) -> None:
    state = PoolReader(client).read()
    assert state.watches_active == 0
    assert (state.watches_overdue.count, state.watches_overdue.oldest_age_s) == (0, 0.0)
    assert (state.events_pending.count, state.events_pending.oldest_age_s) == (0, 0.0)
    assert (state.events_overdue.count, state.events_overdue.oldest_age_s) == (0, 0.0)
    assert state.dead_letters == 0
    assert state.last_sweep is None
    assert state.pauses == {}
    assert abs(state.now - time.time()) < 5


def test_overdue_watches_count_only_past_due_ones_and_age_by_the_oldest(client: redis.Redis) -> None:
    store = WatchStore(client, state_ttl_s=60)
    now = redis_now(client)
    for n, first_poll_at in enumerate((now - 120, now - 30, now + 300)):
        store.create(
            watch_id=f"w_{n}",
            job_id=f"J-{n}",
            callback_url=f"https://hooks.example.com/{n}",
            metadata=None,
            now=now - 200,
            first_poll_at=first_poll_at,
            deadline=now + 3600,
        )
    state = PoolReader(client).read()
    assert state.watches_active == 3
    assert state.watches_overdue.count == 2
    assert 119.9 <= state.watches_overdue.oldest_age_s < 130


def test_pending_events_age_by_creation_and_overdue_by_due_time(client: redis.Redis) -> None:
    now = redis_now(client)
    due_key = f"{PREFIX}due:events"
    # One event created 10 min ago and waiting for a retry in an hour; one created a
    # minute ago whose attempt is 20 s late.
    for webhook_id, created, due in (("msg_a", now - 600, now + 3600), ("msg_b", now - 60, now - 20)):
        client.hset(f"{PREFIX}event:{webhook_id}", mapping={"created_at": f"{created:.3f}", "state": "active"})
        client.zadd(due_key, {webhook_id: due})
    client.zadd(DEAD_KEY, {"msg_dead1": now, "msg_dead2": now})
    state = PoolReader(client).read()
    assert state.events_pending.count == 2
    assert 599.9 <= state.events_pending.oldest_age_s < 610
    assert state.events_overdue.count == 1
    assert 19.9 <= state.events_overdue.oldest_age_s < 30
    assert state.dead_letters == 2


def test_pauses_in_force_are_read_with_their_time_left(client: redis.Redis) -> None:
    now = redis_now(client)
    client.set(BLOCKED_KEY, f"{now + 30:.3f}")
    client.set(TURNS_KEY, f"{now + 4:.3f}")
    client.set(KEY_REFUSED_KEY, f"{now - 90:.3f}")
    pauses = PoolReader(client).read().pauses
    assert set(pauses) == {"retry_after", "rate_limit", "key_refused"}
    assert 25 < pauses["retry_after"] < 30.01
    assert 0 < pauses["rate_limit"] < 4.01
    assert 89.9 <= pauses["key_refused"] < 100
    # Past pauses are not in force.
    client.set(BLOCKED_KEY, f"{now - 1:.3f}")
    client.delete(TURNS_KEY, KEY_REFUSED_KEY)
    assert PoolReader(client).read().pauses == {}


def test_sweeps_record_their_beat_and_tell_one_beat_from_two(client: redis.Redis) -> None:
    now = 1_800_000_000.0
    # A beat restarted: the old one's sweeps stopped before the new one's began.
    for t in range(0, 60, 15):
        record_sweep(client, "gen1@host-a", now + t)
    for t in range(75, 150, 15):
        record_sweep(client, "gen2@host-a", now + t)
    latest = now + 135
    assert last_sweep(client) == latest
    beats = recent_beats(client, latest, within_s=300)
    assert [b.origin for b in beats] == ["gen2@host-a", "gen1@host-a"]
    assert len(overlapping(beats, 15)) < 2
    # A second beat on another host, sweeping at the same time as the first.
    for t in range(150, 240, 15):
        record_sweep(client, "gen2@host-a", now + t)
        record_sweep(client, "gen7@host-b", now + t + 7)
    latest = now + 232
    both = overlapping(recent_beats(client, latest, within_s=60), 15)
    assert sorted(b.origin for b in both) == ["gen2@host-a", "gen7@host-b"]
    # A silent pool: no beat within the window.
    assert recent_beats(client, latest + 3600, within_s=60) == []


def test_an_origin_is_kept_short_and_plain(client: redis.Redis) -> None:
    record_sweep(client, "evil\nname " + "x" * 500, 1_800_000_000.0)
    (beat,) = recent_beats(client, 1_800_000_000.0, within_s=1)
    assert len(beat.origin) <= 120
    assert "\n" not in beat.origin and " " not in beat.origin
    record_sweep(client, None, 1_800_000_001.0)
    assert "unknown" in {b.origin for b in recent_beats(client, 1_800_000_001.0, within_s=5)}


def test_beats_unheard_of_for_a_day_are_forgotten(client: redis.Redis) -> None:
    record_sweep(client, "gen1@old", 1_800_000_000.0)
    record_sweep(client, "gen2@new", 1_800_000_000.0 + 2 * 86400)
    assert {b.origin for b in recent_beats(client, 1_800_000_000.0 + 2 * 86400, within_s=10 * 86400)} == {"gen2@new"}
