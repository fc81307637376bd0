"""When to poll a Check365 job next: pure functions of the observed history.

Nothing here reads a clock, Redis or Celery: the caller passes ``now`` and the
recent observations it keeps in the watch state (``remember``,
``observations_to_json`` and ``observations_from_json``), and turns the
returned delay into a countdown.

Poll gaps (``next_poll_delay``)
    The first poll comes ``initial_delay`` after the watch starts. From then
    on a robust line (Theil-Sen) through the recent readings, with the start
    of the watch as a reading of 0 %, predicts when the job reaches 100 %.
    Time between equal readings is cut out first, so that a pause does not
    slow down the predicted pace once the job runs again.

    The next poll is aimed just after the predicted completion, moved earlier
    by the uncertainty of the prediction (the scatter of the readings around
    the line and the length of the extrapolation) and by the fastest recent
    pace: a poll that comes too early costs one request, one that comes too
    late delays the webhook. A completion more than ``max_delay`` away is
    approached in ``max_delay`` steps, each refining the estimate. Once within
    the uncertainty, the predicted moment is scanned ``initial_delay`` apart,
    or wider when the uncertainty is very wide.

    Before any progress shows, the gaps double from ``initial_delay``. While
    progress stands still they grow by 30 % each poll, but not beyond the
    moment a resumed job could finish, until the pause has lasted four times
    that long. A job that has stood still for twice as long as it ever
    progressed (the pause counted from the last reading below its current
    level) is presumed dead: the gaps then double each poll up to
    ``max_delay``. Every gap lies within ``(0, max_delay]`` and ends at the
    watch deadline at the latest.

    Check365 reports whole percents: such a reading is taken as the middle of
    its percent, and equal readings count as a pause only once they have
    stood for longer than a percent takes at the pace so far.

    ``patience`` (``POLL_PATIENCE``) moves all this along the trade-off
    between polls and detection lag; the figures above are for 1. Below 1,
    aims come earlier, scans closer, and gaps while progress cannot foretell
    the end are shorter and capped at ``patience * max_delay``. Above 1, gaps
    while progress stands still grow faster, scans widen, and an aimed poll
    leans towards the latest completion the whole-percent readings allow.

    ``benchmarks/polling.py`` measures the schedule against a fixed interval,
    plain doubling and the fewest polls possible, and with ``--frontier``
    against fixed intervals from 2 s to 300 s at several patiences.

Transient failures (``transient_delay``)
    Exponential backoff with jitter, honouring a server-given ``Retry-After``.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from worker.retry_after import capped

__all__ = [
    "DEFAULT_PATIENCE",
    "HISTORY_LIMIT",
    "PATIENCE_MAX",
    "PATIENCE_MIN",
    "SHORT_RESULTS_WAIT_S",
    "Observation",
    "incomplete_results_delay",
    "next_poll_delay",
    "observations_from_json",
    "observations_to_json",
    "remember",
    "transient_delay",
]

# The schedule's constants below are written for a patience of 1 (the functions'
# default). POLL_PATIENCE's default is higher: on the benchmark's mixed workload,
# with whole-percent readings, it spends no more polls per job than the schedule did
# before the knob existed (README: Performance).
DEFAULT_PATIENCE = 1.75
# Below this the one-second floor sets every gap anyway; above it every gap is at
# the max delay or aimed at the latest completion already.
PATIENCE_MIN = 0.05
PATIENCE_MAX = 100.0

# History is thinned instead of cut when its newest readings would span less than
# half its whole length.
_CROWDED = 0.5

# Eight points give a rate estimate that resists one or two bad readings while
# the JSON kept per watch stays around 200 bytes.
HISTORY_LIMIT = 8

# Shortest delay ever returned: keeps a countdown strictly positive even when
# the deadline is due now or the settings are sub-second (tests).
_MIN_DELAY_S = 0.01
# Polls are never closer than min(initial_delay, this), whatever the estimate says.
_FLOOR_S = 1.0
# Near a predicted completion, polls are this fraction of initial_delay apart,
# so that the detection lag there is no worse than a fixed initial_delay interval.
_SCAN_FRACTION = 1.0
# Polls are aimed this long after a predicted completion, so that a job that
# finishes exactly on its trend is seen completed at the first try.
_AIM_LATE_S = 0.25
# Until any progress shows, the gap is this fraction of the time since the
# start (x2 per poll): the job may still be queued, and its length is unknown.
_GROWTH_UNSTARTED = 1.0
# While progress stands still, the gap is this fraction of the time since it
# last moved (x1.3 per poll): a pause may end any time, and the last wait of
# a stepwise job ends in its completion, whose lag stays within 30 % of it.
_GROWTH_STALLED = 0.3
# ...but no longer than the time a resumed job needs to finish plus a scan
# step, until the pause has lasted 1/this of the gap: a long pause is unlikely
# to end exactly now, and a job frozen near 100 % must not be polled forever.
_STALL_LAG = 0.25
# A pause longer than this many times the time the job has spent progressing
# marks it as dead rather than paused: polls it is then spared pay for the
# closer stall gaps of live jobs.
_DEAD_RATIO = 2.0
# A presumed-dead job's gap is this fraction of its pause (x2 per poll), so
# that a job that does resume is still seen within the pause's length.
_GROWTH_DEAD = 1.0
# The aim is moved earlier by this many standard errors of the predicted
# completion time: early costs one poll, late costs lag.
_MARGIN_Z = 0.75
# One-sided 95 % Student t quantiles for 1..7 degrees of freedom, relative to
# the normal one, widen the margin so that 3 or 4 points do not look as
# certain as 9.
_T95 = (6.31, 2.92, 2.35, 2.13, 2.02, 1.94, 1.89)
_Z95 = 1.645
# Scatter (percentage points) assumed for a single reading, which has nothing
# to be compared with: integer rounding alone is worth half a point.
_PRIOR_SCATTER_PP = 0.5
# How much faster than the fitted rate the recent pace may be trusted to be.
# The pace between two readings is what a job resumed after a pause or in a
# fast phase will keep, but on noisy readings it overshoots.
_FAST_CAP = 3.0
# An uncertain completion is scanned with at most about this many polls per
# two standard errors: beyond that the gaps widen rather than the polls multiply.
_SCAN_POLLS = 13.0
# From this many points on, the scatter is estimated from the median residual,
# so that one stale reading does not inflate it.
_ROBUST_MIN_POINTS = 5
# From this patience on, polls aim at the latest completion the readings allow.
_PATIENCE_LATEST = 8.0
# Spread of a whole-percent reading around the truth (uniform over one percent).
_QUANTUM_SD_PP = 1 / math.sqrt(12)
# Equal whole-percent readings count as a pause only once they have stood for
# this many times the time one percent takes at the pace so far.
_QUANTUM_WAIT = 2.0
# Progress differences below this (percentage points) count as no change.
_FLAT_EPS = 1e-6
# A rate that would need more than ~30 years to finish is no rate at all, and
# keeping it would only overflow the arithmetic.
_MIN_RATE = 100.0 / 1e9
# Readings (and watch starts) older than this are corrupt state: no watch
# lasts four months.
_MAX_AGE_S = 1e7


@dataclass(frozen=True)
class Observation:
    """One poll: when it ran (unix seconds) and the progress Check365 reported (0..100)."""

    at: float
    progress: float | None


def remember(history: Iterable[Observation], observation: Observation) -> list[Observation]:
    """The history to store after ``observation``: the newest ``HISTORY_LIMIT`` entries.

    Of three equal readings in a row the middle one is dropped: it tells nothing
    the other two do not, and a job polled often while it stands still would
    otherwise forget how it got there.
    """
    kept = [*history, observation]
    if (
        len(kept) >= 3
        and observation.progress is not None
        and kept[-2].progress == kept[-3].progress == observation.progress
    ):
        del kept[-2]
    while len(kept) > HISTORY_LIMIT:
        # Full: the oldest reading goes, unless the newest ones crowd a short
        # moment (a scan); then the one closest to the one before it goes, so that
        # polls made close together do not push out how the job got there.
        span = kept[-1].at - kept[0].at
        gaps = [(b.at - a.at, i) for i, (a, b) in enumerate(itertools.pairwise(kept[:-2]), 1)]
        crowded = kept[-1].at - kept[1].at < _CROWDED * span
        del kept[min(gaps)[1] if gaps and crowded else 0]
    return kept


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
    patience: float = 1.0,
) -> float:
    """Seconds until the next poll of a job, in ``(0, max_delay]``.

    ``history`` holds the recent polls, oldest first, including the one just
    made; with an empty history the answer is ``initial_delay`` at the start
    of the watch. ``deadline`` is when the watch gives up: the delay never
    reaches further, so the timeout is declared on time.
    """
    _check_delays(initial_delay, max_delay)
    if not (math.isfinite(patience) and patience > 0):
        raise ValueError("patience must be a finite number greater than 0")
    if not math.isfinite(now):
        raise ValueError("now must be a finite number of seconds")
    if not math.isfinite(started_at) or started_at > now:
        started_at = now
    started_at = max(started_at, now - _MAX_AGE_S)
    floor = max(min(initial_delay, _FLOOR_S), _MIN_DELAY_S)
    points = _usable_points(history, now)
    delay = _plan(points, started_at - now, initial_delay, max_delay, floor, patience=patience)
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
    ``max_delay`` up to ``worker.retry_after.MAX_RETRY_AFTER_S``.
    """
    _check_delays(initial_delay, max_delay)
    base = max(initial_delay, _MIN_DELAY_S)
    # Past 2**60 the float product only overflows; max_delay caps it long before.
    exponent = min(max(consecutive_failures, 1) - 1, 60)
    ceiling = min(base * 2.0**exponent, max_delay)
    delay = rng.uniform(ceiling / 2, ceiling)
    if retry_after is not None and _is_number(retry_after) and retry_after > 0:
        delay = max(delay, capped(retry_after))
    return delay


# How long a job reported completed with results missing is waited for before its
# results are delivered as they are: Check365's own example answer is such a job.
# A refused API key pauses the whole pool this long between two requests that find out
# whether it works again: a minute, or a quarter of the grace when that is shorter, so
# that a few requests see the key refused before its watches fail.
KEY_REFUSED_PAUSE_S = 60.0


def key_refused_pause(grace_s: float) -> float:
    """How long the pool waits after Check365 refused the API key, for a grace of ``grace_s``."""
    return min(KEY_REFUSED_PAUSE_S, grace_s / 4)


SHORT_RESULTS_WAIT_S = 60.0
_SHORT_RESULTS_MAX_GAP_S = 15.0


def incomplete_results_delay(initial_delay: float, waited_s: float = 0.0, patience: float = 1.0) -> float:
    """Delay before re-polling a job reported completed with results still missing.

    The job is done and its results may still be being written: a short pause at
    first, then half the time waited so far (at most 15 s), so that a job that stays
    short costs about ten polls before ``SHORT_RESULTS_WAIT_S`` ends the wait.
    ``patience`` scales every gap, down to a second at most.
    """
    if not math.isfinite(initial_delay) or initial_delay <= 0:
        first = _FLOOR_S
    else:
        first = max(min(initial_delay, 2.0), _MIN_DELAY_S)
    if not (math.isfinite(patience) and patience > 0):
        patience = 1.0
    first = max(first * patience, min(first, _FLOOR_S))
    if not math.isfinite(waited_s) or waited_s <= 0:
        return first
    return max(first, min(waited_s / 2, _SHORT_RESULTS_MAX_GAP_S) * patience)


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
        if not (math.isfinite(at) and math.isfinite(progress)) or progress < 0:
            continue
        # Another worker's clock may run slightly ahead; anything further in the
        # future is corrupt state and would turn every rate upside down.
        if at > now + 1.0 or at < now - _MAX_AGE_S:
            continue
        # A percentage computed from racing counters may overshoot a little.
        points.append((min(at - now, 0.0), min(float(progress), 100.0)))
    points.sort(key=lambda p: p[0])
    return points[-HISTORY_LIMIT:]


def _plan(
    points: list[tuple[float, float]],
    start: float,
    initial_delay: float,
    max_delay: float,
    floor: float,
    *,
    patience: float = 1.0,
) -> float:
    """The delay before clamping; ``start`` and the points' times are relative to now."""
    scan = max(patience * _SCAN_FRACTION * initial_delay, floor)
    # While progress cannot foretell the end, an impatient schedule also caps its
    # gaps in seconds: a fraction of a long pause is still a long lag.
    blind = max(max_delay * min(patience, 1.0), scan)
    if not points or max(p for _, p in points) <= _FLAT_EPS:
        return min(max(initial_delay, patience * _GROWTH_UNSTARTED * -start), blind)
    whole = all(p == int(p) for _, p in points)
    points = _midpoints(points) if whole else points
    # The watch usually starts when the job is created: (start, 0) is one more
    # reading, and the only other one after the first poll.
    pts = [(start, 0.0), *points] if start < points[0][0] else points

    # pts[run:] is the trailing run of equal readings: two or more mean a pause.
    last = pts[-1][1]
    run = len(pts) - 1
    while run > 0 and abs(pts[run - 1][1] - last) <= _FLAT_EPS:
        run -= 1
    if whole and _ticking(pts, run):
        # Readings that stay equal for less than a percent's time are no pause,
        # and add nothing to the fit.
        pts = pts[: run + 1]
        run = len(pts) - 1
    # Progress last moved just before its best reading was first seen.
    best = max(p for _, p in pts)
    first_best = next(i for i, (_, p) in enumerate(pts) if p >= best - _FLAT_EPS)
    idle = -(pts[first_best - 1][0] if first_best > 0 else start)
    active = _active_axis(pts)
    line = _fit(active)
    if line is None:
        return min(max(scan, patience * _GROWTH_STALLED * idle), blind)
    rate, position, scatter, t_mean, sxx, n = line

    fast = rate
    if all(b[1] >= a[1] - _FLAT_EPS for a, b in itertools.pairwise(pts)):
        # Readings that never go backwards are taken at face value.
        position = max(position, last)
        for (ta, pa), (tb, pb) in itertools.pairwise(active):
            if tb - ta > 1e-6:
                fast = max(fast, (pb - pa) / (tb - ta))
        fast = min(fast, (1.0 + (_FAST_CAP - 1.0) / max(patience, 1.0)) * rate)
    left = max(100.0 - position, 0.0)
    remaining = left / rate

    if run < len(pts) - 1:
        # Stalled (or between two steps of a stepwise job). On the active axis
        # the oldest point lies as far back as the job has been progressing.
        if idle > _DEAD_RATIO * -active[0][0]:
            return min(max(scan, patience * _GROWTH_DEAD * idle), blind)
        stalled_gap = max(scan, patience * _GROWTH_STALLED * idle)
        resume_gap = max((100.0 - last) / fast + scan, patience * _STALL_LAG * idle)
        return min(stalled_gap, resume_gap, blind)

    dof = n - 2
    if dof <= 0:
        scatter, z = _PRIOR_SCATTER_PP, _MARGIN_Z
    else:
        z = _MARGIN_Z * max(_T95[min(dof, len(_T95)) - 1] / _Z95, 1.0)
    if whole:
        scatter = max(scatter, _QUANTUM_SD_PP)
    # Standard error of the time at which the line reaches 100 %.
    sigma = scatter * math.sqrt(1 / n + (remaining - t_mean) ** 2 / sxx) / rate
    step = max(scan, 2 * sigma / _SCAN_POLLS)
    # The earlier of the cautious estimate and the recent pace: too early costs
    # one poll, too late costs lag. Patience below 1 aims earlier and scans closer.
    aim = min(remaining - z / min(patience, 1.0) * sigma, left / fast)
    if patience > 1.0:
        # Patient: lean towards the latest completion the readings allow, where
        # one poll sees the end, trading lag for the polls of a scan.
        latest = _latest_end(pts, started=pts[0][0] == start, whole=whole, fallback=remaining + _Z95 * sigma)
        aim += min((patience - 1.0) / (_PATIENCE_LATEST - 1.0), 1.0) * max(latest - aim, 0.0)
    target = max(aim, remaining)
    if target + _AIM_LATE_S < floor:
        # Past the predicted moment: the prediction was early, and a patient
        # schedule does not keep polling at the floor for it.
        return max(floor, min(step, patience * floor))
    if aim > max_delay:
        # Far away: the polls on the way there refine the estimate.
        return max_delay
    if aim >= scan:
        return aim + _AIM_LATE_S
    # Within the uncertainty of the prediction: scan it.
    return max(floor, min(step, target + _AIM_LATE_S))


def _ticking(pts: list[tuple[float, float]], run: int) -> bool:
    """Whether the trailing equal whole-percent readings from ``run`` on may just be waiting for the next percent."""
    if not 0 < run < len(pts) - 1:
        return False
    pace = (pts[run][1] - pts[0][1]) / (pts[run][0] - pts[0][0])
    # A whole percent takes 1/pace to tick over.
    return pace > _MIN_RATE and -pts[run][0] < _QUANTUM_WAIT / pace


def _latest_end(points: list[tuple[float, float]], *, started: bool, whole: bool, fallback: float) -> float:
    """The latest completion (seconds from now) of a job that kept at least its pace, given whole percents.

    A reading ``p`` stands for ``[p, p + 1)``, and the start of the watch (the first
    point, when ``started``) for exactly 0. Since each earlier point the job has
    gone at least from its top to the bottom of the last reading; the fastest of
    those slowest paces bounds the completion. Readings that are not whole numbers
    carry no such bounds: ``fallback`` then.
    """
    if not whole or len(points) < 2:
        return fallback
    t1, p1 = points[-1]
    # Undo the midpoint shift: the start of the watch (0) is exact, a reading is its floor.
    low1 = p1 - 0.5 if 0 < p1 < 100 else p1
    tops = [0.0 if i == 0 and started else (1.0 if p <= 0 else p + 0.5) for i, (_, p) in enumerate(points)]
    slowest = max(
        ((low1 - top) / (t1 - t) for (t, _), top in zip(points[:-1], tops, strict=False) if t1 - t > 1e-6),
        default=0.0,
    )
    if slowest <= _MIN_RATE:
        return fallback
    return t1 + (100.0 - low1) / slowest


def _midpoints(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Whole-percent readings moved to the middle of the percent they stand for.

    Check365 reports an integer percent: a reading of 37 covers 37 to 38, and
    taking it at face value puts every prediction half a point late.
    """
    return [(t, p + 0.5 if 0 < p < 100 else p) for t, p in points]


def _active_axis(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points with the time between equal readings cut out, ``now`` staying at 0.

    A pause does not change how fast the job works once it runs again: rates
    are measured on this axis.
    """
    cut = 0.0
    out: list[tuple[float, float]] = []
    for i in range(len(points) - 1, -1, -1):
        t, p = points[i]
        out.append((t + cut, p))
        if i and abs(p - points[i - 1][1]) <= _FLAT_EPS:
            cut += t - points[i - 1][0]
    out.reverse()
    return out


class _Line(NamedTuple):
    rate: float  # percentage points per second, > 0
    position: float  # progress now (time 0)
    scatter: float  # of the readings around the line, percentage points
    t_mean: float
    sxx: float  # sum of squared deviations of the times from t_mean
    n: int


def _fit(points: list[tuple[float, float]]) -> _Line | None:
    """Theil-Sen line through the points, or None without a positive rate.

    The median of pairwise slopes shrugs off a backwards or stale reading that
    would drag a least-squares line.
    """
    slopes = [
        (pj - pi) / (tj - ti) for i, (ti, pi) in enumerate(points) for tj, pj in points[i + 1 :] if tj - ti > 1e-6
    ]
    if not slopes:
        return None
    rate = _median(slopes)
    if not rate > _MIN_RATE:
        return None
    position = _median([p - rate * t for t, p in points])
    n = len(points)
    t_mean = sum(t for t, _ in points) / n
    sxx = max(sum((t - t_mean) ** 2 for t, _ in points), 1e-9)
    if n <= 2:
        return _Line(rate, position, 0.0, t_mean, sxx, n)
    residuals = [p - (position + rate * t) for t, p in points]
    scatter = math.sqrt(sum(r * r for r in residuals) / (n - 2))
    if n >= _ROBUST_MIN_POINTS:
        scatter = min(scatter, 1.4826 * _median([abs(r) for r in residuals]) * n / (n - 2))
    return _Line(rate, position, scatter, t_mean, sxx, n)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2
