"""The Redis scripts: one ``.lua`` file each, loaded by name, and one writer per hash field."""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.delivery.limits import EndpointLimits
from worker.local.redisserver import LocalRedis
from worker.polling.ratelimit import BLOCKED_KEY, RATE_KEY, TURNS_KEY, RateLimiter
from worker.state import scripts
from worker.state.endpoints import EndpointState
from worker.state.outbox import Outbox
from worker.state.store import PREFIX, DurableSet, Lease, LogEntry
from worker.state.watches import WatchStore, active_key

pytestmark = pytest.mark.integration

WORKER = Path(__file__).resolve().parents[2] / "worker"
LUA = {p.stem: p.read_text() for p in Path(str(files("worker.state").joinpath("lua"))).glob("*.lua")}
LIBRARIES = {p.stem: p.read_text() for p in Path(str(files("worker.state").joinpath("lua", "lib"))).glob("*.lua")}
# The fields of the durable-item protocol: written by name in lua/lib/protocol.lua alone.
PROTOCOL_FIELDS = ("state", "token", "due", "armed", "lease_until")
# Fields that scripts of other modules set: by name only in their owner's Lua half (a
# library those scripts include) and, in Python, built only by the owner.
OWNED = {"lib/protocol": ("state/store.py", PROTOCOL_FIELDS), "lib/outbox": ("state/outbox.py", ("started",))}


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    with LocalRedis() as server:
        conn = redis.Redis.from_url(server.url)
        yield conn
        conn.close()


def _python_sources() -> dict[str, str]:
    return {str(p.relative_to(WORKER)): p.read_text() for p in WORKER.rglob("*.py")}


def test_every_script_is_a_lua_file_that_compiles_and_is_loaded_by_name(client: redis.Redis) -> None:
    loaded: dict[str, list[str]] = {}
    for module, text in _python_sources().items():
        assert "redis.call(" not in text, f"{module} holds Lua: scripts live in worker/state/lua"
        for name in re.findall(r'scripts\.load\(\s*\w+,\s*"(\w+)"\)', text):
            loaded.setdefault(name, []).append(module)
    assert set(loaded) == set(LUA), "a .lua file nobody loads, or a load of a missing file"
    for name in LUA:
        assert len(loaded[name]) == 1, f"{name}.lua is loaded by {loaded[name]}"
        client.script_load(scripts.source(name))  # compiles, or raises


def _code(text: str) -> str:
    return "\n".join(line.split("--")[0] for line in text.splitlines())


def test_protocol_fields_are_written_by_the_store_alone() -> None:
    """state, token, due, armed and lease_until: only the store's Lua half (lib/protocol.lua,
    which every script that moves an item includes) writes them by name, and only store.py
    builds the maps other scripts write (``opening``, ``closing``). Likewise an event's
    ``started``, which the endpoint's gate sets through the outbox's (lib/outbox.lua)."""
    sources = {**LUA, **{f"lib/{name}": text for name, text in LIBRARIES.items()}}
    for name, text in sources.items():
        for key, rest in re.findall(r"redis\.call\('HSET',\s*([^,]+),([^)]*)\)", _code(text)):
            if key.strip() == "ep":
                continue  # an endpoint's hash: its 'state' is its breaker's
            named = set(re.findall(r"'(\w+)'", rest))
            for owner, (_, fields) in OWNED.items():
                assert name == owner or not named & set(fields), f"{name}.lua writes {named & set(fields)}"
        for library in LIBRARIES:
            if name in LUA and f"{library}." in _code(text):
                assert f"--@include {library}" in text, f"{name}.lua calls {library} without including it"
    for module, text in _python_sources().items():
        if not module.startswith("state/"):
            assert not re.search(r"\.hset\(|\.hincrby\(", text), f"{module} writes a hash outside worker/state"
        else:
            for owner_module, fields in OWNED.values():
                if module != owner_module:
                    for field in fields:
                        assert not re.search(rf'"{field}":\s', text), f"{module} builds the field {field!r}"


def test_an_included_library_is_pasted_whole(client: redis.Redis) -> None:
    claim = scripts.source("claim")
    assert "--@include" not in claim and LIBRARIES["protocol"] in claim
    assert "--@include" not in "".join(scripts.source(name) for name in LUA)


def test_structured_arguments_keep_every_byte_of_the_values(client: redis.Redis) -> None:
    items = DurableSet(client, "event", "events")
    client.hset(items.key("e1"), mapping={"state": "active", "token": "t", "due": "0", "armed": "0"})
    odd = 'quote " backslash \\ newline \n é 漢 \U0001f600 {"json": [1]}'
    log = LogEntry(f"{PREFIX}log:e1", '{"error":"' + odd.replace("\\", "\\\\").replace('"', '\\"') + '"}')
    assert items.run(items.schedule("e1", "t", 12.5, armed=False, fields={"last_error": odd, "tries": "2"}, log=log))
    assert client.hget(items.key("e1"), "last_error") == odd.encode()
    assert client.lrange(log.key, 0, -1) == [log.entry.encode()]
    assert client.hget(items.key("e1"), "armed") == b"0"
    assert client.zscore(items.due_key, "e1") == 12.5
    assert not items.run(items.schedule("e1", "other-holder", 99, armed=True))


def test_cancel_is_one_script_that_frees_the_pair_and_outdates_the_pending_message(client: redis.Redis) -> None:
    watches = WatchStore(client, state_ttl_s=60)
    created = watches.create(
        watch_id="w_cancel", job_id="J-c", callback_url="https://h.example/x", metadata=None,
        now=100.0, first_poll_at=105.0, deadline=1000.0,
    )  # fmt: skip
    assert created.token is not None
    assert watches.cancel("w_cancel")
    assert client.get(active_key("J-c", "https://h.example/x")) is None
    assert watches.claim("w_cancel", created.token, Lease(200.0, 100.0)) is None
    watch = watches.get("w_cancel")
    assert watch is not None and watch.state == "cancelled" and watch.outcome == "cancelled"
    assert 0 < client.ttl(watches.items.key("w_cancel")) <= 60
    assert not watches.cancel("w_cancel")


def test_replay_reopens_only_a_dead_letter(client: redis.Redis) -> None:
    outbox = Outbox(client, state_ttl_s=60)
    key = outbox.items.key("e_dead")
    client.hset(key, mapping={"webhook_id": "e_dead", "state": "dead", "token": "", "tries": "5", "replays": "1"})
    client.zadd(f"{PREFIX}dead", {"e_dead": 1.0})
    token = outbox.replay("e_dead", 500.0)
    assert token is not None
    stored = client.hgetall(key)
    assert stored[b"state"] == b"active" and stored[b"token"] == token.encode() and stored[b"tries"] == b"0"
    assert stored[b"replays"] == b"2" and stored[b"armed"] == b"1"
    assert client.zscore(f"{PREFIX}dead", "e_dead") is None
    assert client.zscore(outbox.items.due_key, "e_dead") == 500.0
    assert outbox.replay("e_dead", 600.0) is None


def _evalsha_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_an_attempt_is_booked_and_its_endpoint_settled_in_one_call(client: redis.Redis) -> None:
    outbox = Outbox(client, state_ttl_s=60)
    endpoints = EndpointState(client, due_key=outbox.items.due_key, rearm_grace_s=30)
    limits = EndpointLimits(max_in_flight=2, breaker_threshold=1, cooldown_s=30)
    endpoint = "https://book.example"
    inflight = f"{PREFIX}endpoint_inflight:{endpoint}"
    for webhook_id in ("e_book", "e_lost"):
        client.hset(
            outbox.items.key(webhook_id),
            mapping={"webhook_id": webhook_id, "state": "active", "token": "h-" + webhook_id, "due": "0",
                     "armed": "0", "started": '{"holder":"h-' + webhook_id + '"}'},
        )  # fmt: skip
        client.zadd(inflight, {"h-" + webhook_id: 1e12})
    endpoints.settle(endpoint, holder="", outcome="none", limits=limits, now=1.0)  # scripts loaded

    before = _evalsha_calls(client)
    booking = outbox.mark_delivered("e_book", "h-e_book", 100.0, 1, {"ok": True})
    settled = endpoints.settle(
        endpoint, holder="h-e_book", outcome="ok", limits=limits, now=100.0, webhook_id="e_book", closed=True,
        booking=booking,
    )  # fmt: skip
    assert _evalsha_calls(client) == before + 1
    assert settled.booked and settled.state == "closed"
    event = outbox.get("e_book")
    assert event is not None and event.state == "delivered" and event.started == "" and event.tries == 1
    assert [a["ok"] for a in event.attempts] == [True]
    assert client.zscore(inflight, "h-e_book") is None

    # A step that lost its claim still frees its slot and feeds the breaker; its booking does nothing.
    lost = outbox.retry_later("e_lost", "someone-else", 200.0, armed=True, tries=1, last_error="HTTP 500", attempt={})
    settled = endpoints.settle(
        endpoint, holder="h-e_lost", outcome="fail", limits=limits, now=100.0, webhook_id="e_lost", booking=lost
    )
    assert not settled.booked and settled.transition == "opened"
    assert client.hget(outbox.items.key("e_lost"), "tries") is None
    assert client.zscore(inflight, "h-e_lost") is None


class _CountingConnection(redis.Connection):
    """Counts what reaches the socket: one send per round trip (a pipeline sends all its commands at once)."""

    sends = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        super().send_packed_command(command, check_health)


def test_a_watch_started_for_a_poll_now_takes_its_rate_limit_turn_in_the_same_round_trip(client: redis.Redis) -> None:
    kwargs = client.connection_pool.connection_kwargs
    counted = redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=_CountingConnection, host=kwargs["host"], port=kwargs["port"]
        )
    )
    watches = WatchStore(counted, state_ttl_s=60)
    limiter = RateLimiter(counted, max_rps=1)
    client.delete(RATE_KEY, TURNS_KEY, BLOCKED_KEY)
    client.script_flush()  # as after a restart of Redis: the calls load their scripts again

    def start(job_id: str) -> Any:
        _CountingConnection.sends = 0
        created = watches.create(
            watch_id=f"w_rt_{job_id}",
            job_id=job_id,
            callback_url="https://hooks.example.com/rt",
            metadata=None,
            now=1000.0,
            first_poll_at=1000.0,
            deadline=2000.0,
            lease=Lease.starting(1000.0, 30),
            also=[limiter.acquire_call()],
        )
        return created, _CountingConnection.sends

    first, _ = start("J-rt-1")
    assert first.token is not None and limiter.wait_of(first.also[0]) == 0.0
    second, sends = start("J-rt-2")
    assert second.token is not None and second.watch is not None
    # One request a second: the second watch's first poll waits for its turn.
    assert 0.0 < limiter.wait_of(second.also[0]) <= 1.0
    assert sends == 1
    # The same pair again: no new watch, and the call that rode along still ran.
    again, sends = start("J-rt-2")
    assert again.token is None and again.watch_id == "w_rt_J-rt-2" and len(again.also) == 1
    assert sends == 1
    counted.close()


def test_calls_run_together_answer_in_order_and_raise_what_fails(client: redis.Redis) -> None:
    echo = client.register_script("return ARGV[1]")
    broken = client.register_script("return redis.error_reply('refused here')")
    answers = scripts.run_together(client, [scripts.Call(echo, [], ["a"]), scripts.Call(echo, [], ["b"])])
    assert answers == [b"a", b"b"]
    with pytest.raises(redis.ResponseError, match="refused here"):
        scripts.run_together(client, [scripts.Call(echo, [], ["a"]), scripts.Call(broken, [], [])])
