"""Retry-After, from Check365 and from receivers alike: its parsing and its one cap."""

from __future__ import annotations

import math
import re
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final

# A server asking for more than an hour is more likely wrong (a misconfigured proxy)
# than right; the watch deadline and the retry schedule still bound the wait.
MAX_RETRY_AFTER_S: Final = 3600.0
# Real Retry-After values are under 40 chars; anything far longer is garbage and
# not worth handing to the date parser.
_MAX_RETRY_AFTER_LEN: Final = 100
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def capped(seconds: float) -> float:
    """A server-given wait, never beyond ``MAX_RETRY_AFTER_S``."""
    return min(seconds, MAX_RETRY_AFTER_S)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or HTTP-date).

    The result lies in [0, 3600]; a missing or unparseable value gives None.
    """
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > _MAX_RETRY_AFTER_LEN:
        return None
    if _DELAY_SECONDS.fullmatch(value):
        return capped(float(value))
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:
            # An HTTP-date is GMT by definition; naive means the zone was "-0000".
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if not math.isfinite(seconds):
        return None
    return capped(max(0.0, seconds))
