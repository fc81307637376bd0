"""The trace context helpers: what a message's traceparent may be, and the no-op path.

One trace end to end, with the SDK's in-memory exporter: tests/integration/test_tracing.py.
"""

from __future__ import annotations

import pytest

from check365_client.tracing import TRACEPARENT, span, valid_traceparent

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "value",
    [
        GOOD.upper(),  # W3C: lower-case hex only
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # unknown version
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        GOOD + "-extra",
        GOOD[:-1],
        "",
        None,
        42,
        ["00", "4bf92f3577b34da6a3ce929d0e0e4736"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
    ],
)
def test_a_malformed_traceparent_from_a_message_is_dropped(value: object) -> None:
    assert valid_traceparent(value) == ""


def test_a_well_formed_traceparent_is_kept() -> None:
    assert valid_traceparent(GOOD) == GOOD


def test_without_a_configured_provider_the_producers_context_is_passed_on_unchanged() -> None:
    # No tracer provider is set in this process: nothing is recorded, and the block
    # still sees the context it continues, so a receiver can join the producer's trace.
    with span("check365.deliver", parent=GOOD, kind="client", attributes={"a": 1, "b": None}) as traced:
        traced.set("http.response.status_code", 200)
        assert traced.headers() == {TRACEPARENT: GOOD}
    with span("check365.enqueue_watch", kind="producer") as traced:
        assert traced.headers() == {}
    with span("check365.poll", parent="garbage") as traced:
        assert traced.traceparent == ""
