"""How long a step may run, and how long it holds its item: the hold always outlasts the run.

A step holds its watch or event under a lease; when the lease ends, the sweep hands the
item to another step. httpx's timeouts bound each read, not a whole request, so an
answer that trickles in could outlast any lease, and two steps would then hold the same
item: each exchange therefore has a total budget, checked between the chunks of its
answer, and each task a hard time limit built from those budgets (the prefork pool kills
a process that runs past it, whatever it is blocked on). A lease is that limit plus a
margin, so no step is still running when its item is handed on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from worker.delivery.policy import CallbackPolicy, longest_timeout_s
from worker.errors import OutOfTime
from worker.settings import Settings

# Redis round trips, signing and logging around a step's HTTP exchanges.
_SLACK_S = 10.0
# Clocks of different hosts and the pool's check of its time limits (about once a second).
LEASE_MARGIN_S = 5.0


def status_budget_s(settings: Settings) -> float:
    """The whole status request: connecting, sending, and every chunk of the answer."""
    return 2 * settings.check365_timeout_s


def attempt_budget_s(policy: CallbackPolicy) -> float:
    """One webhook attempt in whole: connecting, sending the body, and the receiver's answer."""
    return 2 * policy.timeout_s


def webhook_budget_s(settings: Settings) -> float:
    """The longest webhook attempt: an endpoint's ``timeout_s`` may exceed ``WEBHOOK_TIMEOUT_S``,
    and the limits built from this must hold any endpoint's attempt."""
    return 2 * longest_timeout_s(settings)


def watch_time_limit_s(settings: Settings) -> float:
    # A watch step polls and, when the poll ends the watch with a single event, delivers it.
    return status_budget_s(settings) + webhook_budget_s(settings) + _SLACK_S


def delivery_time_limit_s(settings: Settings) -> float:
    return webhook_budget_s(settings) + _SLACK_S


def watch_lease_s(settings: Settings) -> float:
    """The hold of a watch step on its watch, and on the event it creates to deliver itself."""
    return watch_time_limit_s(settings) + LEASE_MARGIN_S


def delivery_lease_s(settings: Settings) -> float:
    """The hold of a delivery step on its event."""
    return delivery_time_limit_s(settings) + LEASE_MARGIN_S


def within(chunks: Iterable[bytes], deadline: float) -> Iterator[bytes]:
    """``chunks`` until ``deadline`` (``time.monotonic``) has passed between two of them."""
    for chunk in chunks:
        if time.monotonic() > deadline:
            raise OutOfTime
        yield chunk


def head(chunks: Iterable[bytes], limit: int) -> bytes:
    """The first ``limit`` bytes of a body; the rest is left unread."""
    kept = bytearray()
    for chunk in chunks:
        kept += chunk
        if len(kept) >= limit:
            break
    return bytes(kept[:limit])
