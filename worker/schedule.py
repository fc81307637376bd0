"""When to poll a Check365 job next: pure functions of the observed history.

Nothing here reads a clock, Redis or Celery: the caller passes ``now`` and the
recent observations it keeps in the watch state, and turns the returned delay
into a countdown.

Poll gaps (``next_poll_delay``)
    The first poll comes ``initial_delay`` after the watch starts. Afterwards
    the progress rate seen in the recent observations predicts when the job
    completes, and the next poll is aimed just after that moment; a job that
    is far from done is polled every ``max_delay`` so that the estimate keeps
    improving. When the prediction is uncertain (noisy or stepwise progress),
    the poll is aimed early by the uncertainty and the predicted moment is
    then scanned at short gaps, because a poll that comes too early costs one
    request while one that comes too late delays the webhook. Without a
    usable rate (no progress reported yet, or progress stalled) the gaps grow
    geometrically from the last time progress moved. Every gap stays within
    ``(0, max_delay]`` and never passes the watch deadline.

Transient failures (``transient_delay``)
    Exponential backoff with jitter, honouring a server-given ``Retry-After``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "HISTORY_LIMIT",
    "RETRY_AFTER_CAP_S",
    "Observation",
    "incomplete_results_delay",
    "next_poll_delay",
    "observations_from_json",
    "observations_to_json",
    "remember",
    "transient_delay",
]

# Eight points give a rate estimate that resists one or two bad readings while
# the JSON kept per watch stays around 300 bytes.
HISTORY_LIMIT = 8

# A Retry-After beyond an hour is more likely a misconfigured proxy than a
# real instruction; the watch deadline still bounds the total wait.
RETRY_AFTER_CAP_S = 3600.0

# Shortest delay ever returned: keeps a countdown strictly positive even when
# the deadline is due now or the settings are sub-second (tests).
_MIN_DELAY_S = 0.01
# Polls are never closer than min(initial_delay, this), whatever the estimate says.
_FLOOR_S = 1.0
# Without a rate, the next gap is this fraction of the time since progress last
# moved: gaps then grow by 1.5x per poll, reaching max_delay quickly.
_GROWTH = 0.5
_GROWTH_UNSTARTED = 1.0
_STALL_LAG = 0.1
# Near a predicted completion, polls are this fraction of initial_delay apart:
# the detection lag is then no worse than a fixed initial_delay interval.
_SCAN_FRACTION = 0.8
# Polls are aimed this long after the predicted completion, so that a job
# finishing exactly on its trend is seen completed on the first try.
_AIM_LATE_S = 0.25
# How many standard deviations of the predicted completion time the aim is
# moved earlier before scanning.
_MARGIN_Z = 1.65
# Relative uncertainty of a rate measured from a single observation: with
# nothing to compare it to, assume it may be this far off.
_PRIOR_SCATTER_PP = 0.5
_PRIOR_DOF = 1.0
# Progress differences below this (percentage points) count as no change.
_FLAT_EPS = 1e-6
_FAST_CAP = 3.0
_MAX_SCAN_POLLS = 10.0


@dataclass(frozen=True)
class Observation:
    """One poll: when it ran (unix seconds) and the progress Check365 reported (0..100)."""

    at: float
    progress: float | None


def remember(history: Iterable[Observation], observation: Observation) -> list[Observation]:
    """The history to store after ``observation``: the newest ``HISTORY_LIMIT`` entries."""
    kept = [*history, observation]
    return kept[-HISTORY_LIMIT:]


def observations_to_json(observations: Iterable[Observation]) -> list[list[float | None]]:
    """``[[at, progress], ...]``, strict JSON: non-finite values are dropped or nulled."""
    out: list[list[float | None]] = []
    for obs in observations:
        if not _is_number(obs.at) or not math.isfinite(obs.at):
            continue
        progress = obs.progress
        if progress is not None and not (_is_number(progress) and math.isfinite(progress)):
            progress = None
        out.append([float(obs.at), None if progress is None else float(progress)])
    return out


def observations_from_json(value: object) -> list[Observation]:
    """Parse what ``observations_to_json`` produced (or its JSON text).

    Watch state may come from an older version or be edited by hand, so
    anything unexpected is skipped rather than raised: at worst the schedule
    falls back to plain growth.
    """
    if isinstance(value, bytes | bytearray):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if not isinstance(value, list):
        return []
    out: list[Observation] = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 2:
            continue
        at, progress = item
        if not _is_number(at) or not math.isfinite(at):
            continue
        if progress is not None and not (_is_number(progress) and math.isfinite(progress)):
            progress = None
        out.append(Observation(float(at), None if progress is None else float(progress)))
    return out[-HISTORY_LIMIT:]


def next_poll_delay(
    history: Sequence[Observation],
    *,
    now: float,
    started_at: float,
    deadline: float,
    initial_delay: float,
    max_delay: float,
) -> float:
    """Seconds until the next poll of a job, in ``(0, max_delay]``.

    ``history`` holds the recent polls, oldest first, including the one just
    made; with an empty history the answer is ``initial_delay`` at the start
    of the watch. ``deadline`` is when the watch gives up: the delay never
    reaches further, so the timeout is declared on time.
    """
    _check_delays(initial_delay, max_delay)
    if not math.isfinite(now):
        raise ValueError("now must be a finite number of seconds")
    if not math.isfinite(started_at) or started_at > now:
        started_at = now
    floor = max(min(initial_delay, _FLOOR_S), _MIN_DELAY_S)
    points = _usable_points(history, now)
    delay = _plan(points, now, started_at, initial_delay, max_delay, floor)
    if not math.isnan(deadline):
        delay = min(delay, deadline - now)
    return min(max(delay, _MIN_DELAY_S), max_delay)


def transient_delay(
    consecutive_failures: int,
    *,
    initial_delay: float,
    max_delay: float,
    retry_after: float | None,
    rng: random.Random,
) -> float:
    """Delay before retrying a poll after ``consecutive_failures`` failures in a row.

    Doubles from ``initial_delay`` up to ``max_delay``, drawn uniformly from the
    upper half of that value so that watches failing together spread out. A
    ``retry_after`` from the server is a floor, honoured even beyond
    ``max_delay`` up to ``RETRY_AFTER_CAP_S``.
    """
    _check_delays(initial_delay, max_delay)
    base = max(initial_delay, _MIN_DELAY_S)
    # Past 2**60 the float product only overflows; max_delay caps it long before.
    exponent = min(max(consecutive_failures, 1) - 1, 60)
    ceiling = min(base * 2.0**exponent, max_delay)
    delay = rng.uniform(ceiling / 2, ceiling)
    if retry_after is not None and _is_number(retry_after) and retry_after > 0:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP_S))
    return delay


def incomplete_results_delay(initial_delay: float) -> float:
    """Delay before re-polling a job reported completed with results still missing.

    The job is done and its results are being written: a short pause is enough.
    """
    if not math.isfinite(initial_delay) or initial_delay <= 0:
        return _FLOOR_S
    return max(min(initial_delay, 2.0), _MIN_DELAY_S)


def _is_number(value: object) -> bool:
    # bool is an int subclass, but True is not a time or a percentage.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_delays(initial_delay: float, max_delay: float) -> None:
    if not (math.isfinite(max_delay) and max_delay > 0):
        raise ValueError("max_delay must be a finite number of seconds greater than 0")
    if not (math.isfinite(initial_delay) and initial_delay >= 0):
        raise ValueError("initial_delay must be a finite number of seconds, at least 0")


def _usable_points(history: Sequence[Observation], now: float) -> list[tuple[float, float]]:
    """``(seconds before now (<= 0), progress)`` for the valid observations, oldest first."""
    points: list[tuple[float, float]] = []
    for obs in history:
        at, progress = obs.at, obs.progress
        if progress is None or not (_is_number(at) and _is_number(progress)):
            continue
        if not (math.isfinite(at) and math.isfinite(progress)) or not 0 <= progress <= 100:
            continue
        # Another worker's clock may run slightly ahead; anything further in the
        # future is corrupt state and would turn every rate upside down.
        if at > now + 1.0:
            continue
        points.append((min(at - now, 0.0), float(progress)))
    points.sort(key=lambda p: p[0])
    return points[-HISTORY_LIMIT:]


def _plan(
    points: list[tuple[float, float]],
    now: float,
    started_at: float,
    initial_delay: float,
    max_delay: float,
    floor: float,
) -> float:
    start = started_at - now  # <= 0, on the same axis as the points
    scan = max(_SCAN_FRACTION * initial_delay, floor)
    growth = max(initial_delay, _GROWTH_UNSTARTED * -start)
    if not points or max(p for _, p in points) <= _FLAT_EPS:
        return growth
    pts = points
    if start < points[0][0] - 1e-6:
        pts = [(start, 0.0), *points]

    last = pts[-1][1]
    k = len(pts) - 1
    while k > 0 and abs(pts[k - 1][1] - last) <= _FLAT_EPS:
        k -= 1
    flat = k < len(pts) - 1
    moved_at = pts[k - 1][0] if k > 0 else start

    fit = _fit(pts)
    if fit is None:
        return max(scan, _GROWTH * -moved_at)
    rate, position, sigma_p, t_mean, sxx, n = fit
    monotone = all(b[1] >= a[1] - _FLAT_EPS for a, b in zip(pts, pts[1:], strict=False))
    fast = rate
    if monotone:
        for (ta, pa), (tb, pb) in zip(pts, pts[1:], strict=False):
            if tb - ta > 1e-6:
                fast = max(fast, (pb - pa) / (tb - ta))
        fast = min(fast, _FAST_CAP * rate)
        position = max(position, last)
    remaining = max(100.0 - position, 0.0) / rate
    dof = n - 2
    scatter = math.sqrt((dof * sigma_p**2 + _PRIOR_DOF * _PRIOR_SCATTER_PP**2) / (dof + _PRIOR_DOF))
    sigma_t = scatter * math.sqrt(1 / n + (remaining - t_mean) ** 2 / sxx) / rate
    fast_remaining = max(100.0 - position, 0.0) / fast
    aim = min(remaining - _MARGIN_Z * sigma_t, fast_remaining)
    # In the endgame the poll budget caps how finely an uncertain window is scanned.
    step = max(scan, 2 * _MARGIN_Z * sigma_t / _MAX_SCAN_POLLS) if aim < scan else scan

    if flat:
        idle = -moved_at
        idle_gap = max(step, _GROWTH * idle)
        resume_gap = max((100.0 - last) / fast + step, _STALL_LAG * idle)
        return min(idle_gap, resume_gap, max_delay)

    if aim > max_delay:
        return max_delay
    if aim >= step:
        return aim + _AIM_LATE_S
    return max(floor, min(step, remaining + _AIM_LATE_S))


def _fit(
    points: list[tuple[float, float]],
) -> tuple[float, float, float, float, float, int] | None:
    """Robust line through the points.

    Returns (rate, position now, scatter in percentage points or None when too
    few points, mean time, sum of squared time deviations, count). Theil-Sen
    (median of pairwise slopes) shrugs off a backwards or stale reading that
    would drag a least-squares line.
    """
    slopes: list[float] = []
    for i, (ti, pi) in enumerate(points):
        for tj, pj in points[i + 1 :]:
            if tj - ti > 1e-6:
                slopes.append((pj - pi) / (tj - ti))
    if not slopes:
        return None
    rate = _median(slopes)
    if not (rate > 0 and math.isfinite(rate)):
        return None
    position = _median([p - rate * t for t, p in points])
    n = len(points)
    times = [t for t, _ in points]
    t_mean = sum(times) / n
    sxx = sum((t - t_mean) ** 2 for t in times)
    if n <= 2 or sxx <= 0:
        return rate, position, 0.0, t_mean, max(sxx, 1e-9), n
    residuals = [p - (position + rate * t) for t, p in points]
    sigma = math.sqrt(sum(r * r for r in residuals) / (n - 2))
    return rate, position, sigma, t_mean, sxx, n


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2
