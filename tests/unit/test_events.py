"""Building completed events: parts one at a time, from a list or from JSON slices."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from worker.delivery.events import (
    COMPLETED,
    Event,
    EventHead,
    JsonSlices,
    completed_events,
    iso_timestamp,
    iter_completed_events,
)
from worker.local.simulator import generate_results

NOW = 1_795_000_000.0


def data_with(results: Any, **fields: Any) -> dict[str, Any]:
    return {
        "jobId": "J-1",
        "status": "completed",
        "creditsUsed": 7,
        "progress": 100,
        "total": 7,
        "results": results,
        "batch": {"name": "march"},
        **fields,
    }


class Slices:
    """A stand-in for a big answer's results: JSON text, read a slice at a time."""

    def __init__(self, results: list[Any], *, indent: int | None = None) -> None:
        self.results = results
        self.indent = indent
        self.read = 0  # slices handed out so far

    def __len__(self) -> int:
        return len(self.results)

    def json_slices(self, size: int) -> Iterator[bytes]:
        for start in range(0, len(self.results), size):
            self.read += 1
            yield json.dumps(self.results[start : start + size], indent=self.indent).encode()


RESULTS = generate_results("J-1", 7)


def test_slices_stand_in_satisfies_the_protocol() -> None:
    assert isinstance(Slices(RESULTS), JsonSlices)
    assert not isinstance(RESULTS, JsonSlices)


@pytest.mark.parametrize("per_part", [1, 2, 3, 7, 1000])
def test_parts_from_slices_hold_every_result_in_order(per_part: int) -> None:
    events = completed_events("w_1", "J-1", data_with(Slices(RESULTS)), {"order": 17}, per_part=per_part, now=NOW)
    count = -(-len(RESULTS) // per_part)
    bodies = [orjson.loads(e.body) for e in events]
    assert [b["data"]["part"] for b in bodies] == [{"index": i, "count": count} for i in range(1, count + 1)]
    assert [r for b in bodies for r in b["data"]["results"]] == RESULTS
    assert all(len(b["data"]["results"]) == per_part for b in bodies[:-1])
    for body in bodies:
        assert body["type"] == COMPLETED
        assert body["data"]["metadata"] == {"order": 17}
        assert {k: body["data"][k] for k in ("jobId", "status", "creditsUsed", "total")} == {
            "jobId": "J-1",
            "status": "completed",
            "creditsUsed": 7,
            "total": 7,
        }
    # A field beyond the documented ones, in part 1 only.
    assert [b["data"].get("batch") for b in bodies] == [{"name": "march"}] + [None] * (count - 1)


@pytest.mark.parametrize("per_part", [1, 3, 1000])
def test_slices_and_lists_give_the_same_bodies(per_part: int) -> None:
    # Compact JSON slices are what orjson writes for the same results: byte for byte.
    class Compact(Slices):
        def json_slices(self, size: int) -> Iterator[bytes]:
            for start in range(0, len(self.results), size):
                yield orjson.dumps(self.results[start : start + size])

    from_list = completed_events("w_2", "J-1", data_with(RESULTS), None, per_part=per_part, now=NOW)
    from_slices = completed_events("w_2", "J-1", data_with(Compact(RESULTS)), None, per_part=per_part, now=NOW)
    assert [e.body for e in from_slices] == [e.body for e in from_list]
    assert [e.webhook_id for e in from_slices] == [e.webhook_id for e in from_list]


def test_slices_go_into_the_body_as_they_are() -> None:
    # Whitespace, escapes and number spellings of Check365's text are kept.
    (event,) = completed_events("w_3", "J-1", data_with(Slices(RESULTS[:2], indent=2)), None, per_part=10, now=NOW)
    assert json.dumps(RESULTS[:2], indent=2).encode() in event.body
    assert orjson.loads(event.body)["data"]["results"] == RESULTS[:2]


def test_parts_are_built_only_when_asked_for() -> None:
    slices = Slices(RESULTS)
    events = iter_completed_events("w_4", "J-1", data_with(slices), None, per_part=2, now=NOW)
    assert slices.read == 0
    first = next(events)
    assert (first.part_index, first.part_count, slices.read) == (1, 4, 1)
    rest = list(events)
    assert [e.part_index for e in rest] == [2, 3, 4]
    assert slices.read == 4


@pytest.mark.parametrize("results", [[], Slices([])], ids=["list", "slices"])
def test_a_job_without_results_is_one_empty_part(results: Any) -> None:
    (event,) = completed_events("w_5", "J-1", data_with(results, total=0), None, per_part=10, now=NOW)
    data = orjson.loads(event.body)["data"]
    assert (data["results"], data["part"]) == ([], {"index": 1, "count": 1})


def test_the_data_passed_in_is_left_unchanged() -> None:
    data = data_with(list(RESULTS))
    before = json.dumps(data)
    completed_events("w_6", "J-1", data, {"k": 1}, per_part=3, now=NOW)
    assert json.dumps(data) == before


def test_event_head_is_the_event_without_its_body() -> None:
    event = Event(webhook_id="msg_1", type=COMPLETED, body=b"{}", part_index=2, part_count=3)
    assert event.head == EventHead("msg_1", COMPLETED, 2, 3)


def test_fields_check365_adds_to_data_go_in_part_one_only() -> None:
    # 100 KB of extra fields over 10 parts would be a megabyte of bodies if every part
    # carried them.
    extra = {"report": "r" * 100_000, "batch": {"name": "march"}}
    results = generate_results("J-1", 10)
    data = data_with(results, total=10, **extra)
    events = completed_events("w_7", "J-1", data, {"k": 1}, per_part=1, now=NOW)
    parts = [orjson.loads(e.body)["data"] for e in events]
    assert len(parts) == 10
    assert {k: parts[0][k] for k in extra} == extra
    for part in parts[1:]:
        assert not set(extra) & set(part)
    every = {
        "jobId": "J-1",
        "status": "completed",
        "creditsUsed": 7,
        "progress": 100,
        "total": 10,
        "metadata": {"k": 1},
    }
    assert all({k: part[k] for k in every} == every for part in parts)
    assert [r for part in parts for r in part["results"]] == results
    assert sum(len(e.body) for e in events) < 100_000 + 10 * 1_000


def test_a_single_part_keeps_every_field() -> None:
    (event,) = completed_events("w_8", "J-1", data_with(list(RESULTS), note="n"), None, per_part=10, now=NOW)
    data = orjson.loads(event.body)["data"]
    assert (data["batch"], data["note"]) == ({"name": "march"}, "n")


def test_timestamps_are_the_text_isoformat_writes() -> None:
    def reference(now: float, milliseconds: bool) -> str:
        stamp = datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds" if milliseconds else "seconds")
        return stamp.replace("+00:00", "Z")

    rng = random.Random(5)
    # Fractions that round up to the next second, or just do not; exact milliseconds; the epoch.
    edges = [0.0, 59.9999995, 59.9999994999, 1767225600.9995, 1767225599.9999996, 1e9 + 0.0005, -1.25]
    for now in [
        *edges,
        *(rng.uniform(0, 4e9) for _ in range(20_000)),
        *(round(rng.uniform(1.7e9, 1.8e9), 3) for _ in range(5_000)),
    ]:
        for milliseconds in (False, True):
            assert iso_timestamp(now, milliseconds=milliseconds) == reference(now, milliseconds), now
