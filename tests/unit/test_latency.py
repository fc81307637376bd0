"""The latency of the local servers: fixed, or log-normal with a tail, honoured by both."""

from __future__ import annotations

import random
import statistics
import time

import httpx
import pytest

from worker.local.httpserver import MAX_LATENCY_S, Latency
from worker.local.receiver import Receiver
from worker.local.simulator import STATUS_PATH, Simulator

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


def test_a_fixed_latency_is_always_the_same() -> None:
    rng = random.Random(1)
    assert {Latency(0.25).draw(rng) for _ in range(100)} == {0.25}
    assert Latency().draw(rng) == 0.0


def test_a_latency_with_a_tail_keeps_its_median_and_has_a_long_tail() -> None:
    rng = random.Random(1)
    draws = sorted(Latency(0.25, 0.5).draw(rng) for _ in range(20_000))
    assert statistics.median(draws) == pytest.approx(0.25, rel=0.05)
    p99 = draws[int(0.99 * len(draws))]
    assert 2.5 * 0.25 < p99 < 4.0 * 0.25  # exp(2.33 * 0.5) = 3.2 times the median
    assert max(draws) <= MAX_LATENCY_S


@pytest.mark.parametrize(("text", "expected"), [("0.25", Latency(0.25)), ("0.25~0.5", Latency(0.25, 0.5))])
def test_parse(text: str, expected: Latency) -> None:
    assert Latency.parse(text) == expected


@pytest.mark.parametrize("text", ["", "x", "0.25~", "-1", "nan", "0.25~-1", "3600"])
def test_parse_refuses_what_is_not_a_latency(text: str) -> None:
    with pytest.raises(ValueError, match=r"latency|must"):
        Latency.parse(text)


def test_the_simulator_answers_status_requests_after_its_latency() -> None:
    with Simulator("key", latency=Latency(0.3)) as sim, httpx.Client(base_url=sim.url) as client:
        started = time.monotonic()
        answer = client.get(STATUS_PATH, params={"api_key": "key", "job_id": "sim-1-0s"})
        assert answer.status_code == 200
        assert time.monotonic() - started >= 0.3


def test_the_receiver_answers_webhooks_after_its_latency() -> None:
    with Receiver(SECRET, latency=Latency(0.3)) as receiver, httpx.Client(base_url=receiver.url) as client:
        started = time.monotonic()
        client.post("/hook", content=b"{}")
        assert time.monotonic() - started >= 0.3
        assert len(receiver.received("/hook")) == 1
