"""Polls never wait behind deliveries: a backlog of 1,000 pending deliveries, due polls on time.

A real worker with the app's own pool; a receiver that takes a second to answer each of
about 1,200 webhook parts that complete at once; 60 watches polled every 2 s all along. The
p99 lateness of the polls due while the backlog is pending is compared with the p99 of a
quiet window of the same run (the machine may be shared): at most three seconds more, a bound
generous enough for a loaded machine that still fails by far when deliveries share the polls'
queue (12.6 s against 0.26 s measured).
"""

from __future__ import annotations

import pytest

from benchmarks import backlog

pytestmark = pytest.mark.integration


def test_due_polls_stay_on_time_while_a_thousand_deliveries_are_pending() -> None:
    figures = backlog.run(deliveries=1200, watches=60, receiver_s=1.0, quiet_s=8.0)
    assert figures["peak_pending_deliveries"] >= 1000, figures
    assert figures["backlog"]["polls"] >= 60, figures
    assert figures["backlog"]["p99_s"] <= figures["quiet"]["p99_s"] + 3.0, figures
