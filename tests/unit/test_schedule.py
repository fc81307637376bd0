"""The poll schedule: gap bounds, growth, aiming, stalls, backoff and stored history."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.polling.schedule import (
    DEFAULT_PATIENCE,
    HISTORY_LIMIT,
    PATIENCE_MAX,
    PATIENCE_MIN,
    Observation,
    incomplete_results_delay,
    next_poll_delay,
    observations_from_json,
    observations_to_json,
    remember,
    transient_delay,
)
from worker.retry_after import MAX_RETRY_AFTER_S

T0 = 1_700_000_000.0
INITIAL = 5.0
MAX = 300.0
FAR = T0 + 86_400.0


def delay(history: list[Observation], now: float, *, deadline: float = FAR) -> float:
    return next_poll_delay(history, now=now, started_at=T0, deadline=deadline, initial_delay=INITIAL, max_delay=MAX)


def poll_job(progress_at: Callable[[float], float | None], *, until: float) -> list[tuple[float, float]]:
    """Drive the schedule against ``progress_at(seconds since start)``: (time, gap) pairs."""
    history: list[Observation] = []
    t = T0 + INITIAL
    gaps: list[tuple[float, float]] = []
    while t < T0 + until:
        history = remember(history, Observation(t, progress_at(t - T0)))
        gap = delay(history, t)
        gaps.append((t - T0, gap))
        t += gap
    return gaps


# -- gap bounds --------------------------------------------------------------------

any_float = st.floats(allow_nan=True, allow_infinity=True)
observations = st.builds(
    Observation,
    at=st.one_of(any_float, st.floats(min_value=T0 - 1e5, max_value=T0 + 1e5)),
    progress=st.one_of(st.none(), any_float, st.floats(min_value=-5, max_value=105)),
)


@settings(max_examples=300, deadline=None)
@given(
    history=st.lists(observations, max_size=12),
    now_offset=st.floats(min_value=0, max_value=1e5),
    started_offset=st.one_of(any_float, st.floats(min_value=-10, max_value=1e5)),
    deadline_offset=st.one_of(any_float, st.floats(min_value=-1e3, max_value=1e5)),
    max_delay=st.floats(min_value=1e-3, max_value=1e4),
    initial_fraction=st.floats(min_value=0, max_value=1),
    patience=st.floats(min_value=PATIENCE_MIN, max_value=PATIENCE_MAX),
)
def test_gap_is_positive_finite_and_within_max_delay_for_any_history(
    *,
    history: list[Observation],
    now_offset: float,
    started_offset: float,
    deadline_offset: float,
    max_delay: float,
    initial_fraction: float,
    patience: float,
) -> None:
    now = T0 + now_offset
    deadline = now + deadline_offset
    got = next_poll_delay(
        history,
        now=now,
        started_at=now - started_offset,
        deadline=deadline,
        initial_delay=max_delay * initial_fraction,
        max_delay=max_delay,
        patience=patience,
    )
    assert math.isfinite(got)
    assert 0 < got <= max_delay
    if deadline - now >= 0.01:
        assert got <= deadline - now


@settings(max_examples=100, deadline=None)
@given(
    readings=st.lists(
        st.tuples(st.floats(min_value=0, max_value=7200), st.floats(min_value=0, max_value=100)),
        min_size=1,
        max_size=HISTORY_LIMIT,
    ),
)
def test_duplicates_and_backwards_progress_stay_within_bounds(
    readings: list[tuple[float, float]],
) -> None:
    # Duplicated observations and readings in any order: the worst a
    # hand-edited or racing state can hold.
    history = [Observation(T0 + t, p) for t, p in readings + readings[::-1]]
    now = T0 + max(t for t, _ in readings)
    got = delay(history, now)
    assert 0 < got <= MAX


def test_first_gap_is_the_initial_delay() -> None:
    assert delay([], T0) == INITIAL


def test_invalid_delays_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_delay"):
        next_poll_delay([], now=T0, started_at=T0, deadline=FAR, initial_delay=1, max_delay=0)
    with pytest.raises(ValueError, match="initial_delay"):
        next_poll_delay([], now=T0, started_at=T0, deadline=FAR, initial_delay=-1, max_delay=5)
    with pytest.raises(ValueError, match="now"):
        next_poll_delay([], now=math.nan, started_at=T0, deadline=FAR, initial_delay=1, max_delay=5)


def test_gap_never_passes_the_deadline() -> None:
    history = [Observation(T0 + 600, None)]
    assert delay(history, T0 + 600, deadline=T0 + 603) == pytest.approx(3)
    overdue = delay(history, T0 + 600, deadline=T0 + 500)
    assert 0 < overdue < 0.1


# -- growth without progress -----------------------------------------------------------


@pytest.mark.parametrize("progress", [None, 0.0])
def test_gaps_grow_from_the_initial_delay_to_the_max_without_progress(progress: float | None) -> None:
    gaps = [gap for _, gap in poll_job(lambda _t: progress, until=7200)]
    assert gaps[0] == INITIAL
    growing = gaps[: gaps.index(MAX) + 1]
    assert all(b > a for a, b in pairs(growing))
    assert all(gap == MAX for gap in gaps[len(growing) :])
    assert gaps[-1] == MAX
    # Geometric growth reaches the max in a handful of polls, not hundreds.
    assert gaps.index(MAX) < 10


def pairs(values: list[float]) -> list[tuple[float, float]]:
    return list(itertools.pairwise(values))


# -- aiming at the predicted completion ------------------------------------------------


def test_linear_job_is_polled_just_after_its_predicted_completion() -> None:
    # 0.5 %/s from the start: 100 % at 200 s.
    history = [Observation(T0 + 5, 2.5), Observation(T0 + 100, 50.0)]
    got = delay(history, T0 + 100)
    assert 100 <= got <= 101


def test_linear_job_is_seen_completed_within_a_second_of_finishing() -> None:
    duration = 1000.0
    polls = poll_job(lambda t: min(100.0, 100 * t / duration), until=duration)
    last_t, last_gap = polls[-1]
    assert duration <= last_t + last_gap <= duration + 1
    # Far from completion, the polls are max_delay apart: no more than the
    # max-gap rule requires, plus the first poll and one to refine the aim.
    assert len(polls) <= math.ceil(duration / MAX) + 2


def test_far_completion_is_polled_at_the_max_delay() -> None:
    history = [Observation(T0 + 5, 0.1), Observation(T0 + 305, 6.1)]
    assert delay(history, T0 + 305) == MAX


def test_single_reading_aims_early_rather_than_late() -> None:
    # One reading cannot tell a linear job from a noisy one: the poll lands
    # before the completion the reading predicts, never after it.
    got = delay([Observation(T0 + 5, 5.0)], T0 + 5)
    assert 0 < got < 95


def test_one_stale_reading_does_not_derail_the_aim() -> None:
    duration = 2000.0
    times = [5, 300, 600, 900, 1200, 1500, 1800]
    history = [Observation(T0 + t, 100 * t / duration) for t in times]
    history[4] = Observation(T0 + 1200, 100 * 800 / duration)  # runs backwards
    got = delay(history, T0 + 1800)
    assert 150 <= got <= 201


def test_observations_from_the_future_are_ignored() -> None:
    history = [Observation(T0 + 5, 2.5), Observation(T0 + 100, 50.0)]
    skewed = [*history, Observation(T0 + 5000, 1.0)]
    assert delay(skewed, T0 + 100) == delay(history, T0 + 100)


# -- stalls -----------------------------------------------------------------------------


def test_stalled_job_falls_back_to_growing_gaps() -> None:
    # 1 %/s until 50 %, then frozen: the rate predicts completion at 100 s,
    # but once progress stands still the gaps grow instead of hammering.
    polls = poll_job(lambda t: min(t, 50.0), until=3600)
    stalled = [gap for t, gap in polls if t > 120]
    assert all(b >= a for a, b in pairs(stalled))
    assert stalled[-1] == MAX
    assert len(polls) < 30


def test_short_pause_keeps_gaps_within_a_third_of_it() -> None:
    # 1 %/s until 40 %, still 40 % at 70 s: at most 35 s without progress
    # after 40 s of work, so it may resume any moment; the gap stays a fraction
    # of the pause.
    history = [Observation(T0 + 5, 5.0), Observation(T0 + 35, 35.0), Observation(T0 + 40, 40.0)]
    history.append(Observation(T0 + 70, 40.0))
    got = delay(history, T0 + 70)
    assert 0 < got <= 0.3 * 35 + 1e-9


def test_job_paused_far_longer_than_it_worked_is_presumed_dead() -> None:
    # 1 %/s for 20 s, then frozen at 20 %: by 100 s it may have stood still
    # for 95 s (since the reading before 20 % was first seen), far more than
    # the 20 s it worked, and the gap doubles the pause.
    history = [Observation(T0 + 5, 5.0), Observation(T0 + 20, 20.0), Observation(T0 + 100, 20.0)]
    assert delay(history, T0 + 100) == pytest.approx(95.0)
    history.append(Observation(T0 + 400, 20.0))
    assert delay(history, T0 + 400) == MAX


def test_dead_job_costs_fewer_polls_than_a_paused_one() -> None:
    # Frozen at 10 % after 10 s of work versus paused at 50 % after 50 s.
    dead = poll_job(lambda t: min(t, 10.0), until=3600)
    paused = poll_job(lambda t: min(t, 50.0), until=3600)
    assert len(dead) < len(paused)
    assert dead[-1][1] == MAX


def test_resumed_job_is_aimed_at_its_active_rate() -> None:
    # 1 %/s, paused from 40 s to 240 s, then 1 %/s again: the pause is not
    # work, so the completion is predicted at 300 s, not later.
    history = [
        Observation(T0 + 5, 5.0),
        Observation(T0 + 40, 40.0),
        Observation(T0 + 100, 40.0),
        Observation(T0 + 190, 40.0),
        Observation(T0 + 250, 50.0),
    ]
    got = delay(history, T0 + 250)
    assert 0 < got <= 51


def test_job_stuck_at_100_percent_is_not_hammered() -> None:
    # Reports 100 % without completing: re-polled soon, then less and less often.
    polls = poll_job(lambda t: min(100.0, 2 * t), until=3600)
    later = [gap for t, gap in polls if t > 200]
    assert all(b >= a for a, b in pairs(later))
    assert len(polls) < 40


def test_progress_slightly_over_100_counts_as_100() -> None:
    over = delay([Observation(T0 + 50, 100.4)], T0 + 50)
    assert over == delay([Observation(T0 + 50, 100.0)], T0 + 50)
    assert over < INITIAL


def test_progress_jittering_without_a_trend_is_not_hammered() -> None:
    rng = random.Random(5)
    polls = poll_job(lambda _t: 50 + rng.gauss(0, 1), until=3600)
    assert polls[-1][1] == MAX
    assert len(polls) < 40


# -- transient failures -------------------------------------------------------------------


def test_transient_delay_doubles_up_to_the_max_with_jitter() -> None:
    rng = random.Random(7)
    for failures in range(1, 12):
        ceiling = min(INITIAL * 2 ** (failures - 1), MAX)
        draws = [
            transient_delay(failures, initial_delay=INITIAL, max_delay=MAX, retry_after=None, rng=rng)
            for _ in range(50)
        ]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert len(set(draws)) > 1


def test_transient_delay_treats_zero_failures_as_the_first() -> None:
    got = transient_delay(0, initial_delay=INITIAL, max_delay=MAX, retry_after=None, rng=random.Random(1))
    assert INITIAL / 2 <= got <= INITIAL


@pytest.mark.parametrize("retry_after", [30.0, 900.0])
def test_transient_delay_honours_retry_after_even_beyond_the_max(retry_after: float) -> None:
    rng = random.Random(3)
    got = transient_delay(1, initial_delay=INITIAL, max_delay=MAX, retry_after=retry_after, rng=rng)
    assert got == retry_after


@pytest.mark.parametrize("retry_after", [1e9, math.inf])
def test_transient_delay_caps_an_absurd_retry_after(retry_after: float) -> None:
    got = transient_delay(1, initial_delay=INITIAL, max_delay=MAX, retry_after=retry_after, rng=random.Random(3))
    assert got == MAX_RETRY_AFTER_S


@pytest.mark.parametrize("retry_after", [None, 0.0, -5.0, math.nan])
def test_transient_delay_ignores_a_meaningless_retry_after(retry_after: float | None) -> None:
    got = transient_delay(3, initial_delay=INITIAL, max_delay=MAX, retry_after=retry_after, rng=random.Random(3))
    assert 10 <= got <= 20


def test_transient_delay_with_retry_after_below_the_backoff_keeps_the_backoff() -> None:
    got = transient_delay(8, initial_delay=INITIAL, max_delay=MAX, retry_after=1.0, rng=random.Random(3))
    assert MAX / 2 <= got <= MAX


def test_transient_delay_survives_huge_failure_counts() -> None:
    got = transient_delay(10**9, initial_delay=INITIAL, max_delay=MAX, retry_after=None, rng=random.Random(1))
    assert MAX / 2 <= got <= MAX


# -- incomplete results -------------------------------------------------------------------


@pytest.mark.parametrize(("initial", "expected"), [(5.0, 2.0), (0.05, 0.05), (1.5, 1.5)])
def test_incomplete_results_are_re_polled_shortly(initial: float, expected: float) -> None:
    assert incomplete_results_delay(initial) == expected


def test_incomplete_results_delay_is_positive_without_an_initial_delay() -> None:
    assert incomplete_results_delay(0.0) > 0


# -- stored history ------------------------------------------------------------------------

stored_observations = st.lists(
    st.builds(
        Observation,
        at=st.floats(allow_nan=False, allow_infinity=False),
        progress=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
    ),
    max_size=HISTORY_LIMIT,
)


@given(stored_observations)
def test_history_round_trips_through_json_text(history: list[Observation]) -> None:
    text = json.dumps(observations_to_json(history), allow_nan=False)
    assert observations_from_json(text) == history
    assert observations_from_json(text.encode()) == history
    assert observations_from_json(json.loads(text)) == history


def test_non_finite_values_never_reach_the_json() -> None:
    history = [Observation(math.nan, 5.0), Observation(T0, math.inf), Observation(T0 + 1, 7.0)]
    encoded = observations_to_json(history)
    assert encoded == [[T0, None], [T0 + 1, 7.0]]
    json.dumps(encoded, allow_nan=False)


@pytest.mark.parametrize(
    "garbage",
    [None, 5, "x", "[[1, 2]", b"\xff\xfe", {"at": 1}, [1, 2], "null", '{"a": [1, 2]}', [[True, 3.0]]],
)
def test_garbage_history_reads_as_empty(garbage: object) -> None:
    assert observations_from_json(garbage) == []


def test_bad_entries_are_skipped_and_good_ones_kept() -> None:
    value = [[T0, 10], ["soon", 20], [T0 + 5, "high"], [T0 + 6], [T0 + 7, None, 1], [T0 + 9, 30.5]]
    assert observations_from_json(value) == [
        Observation(T0, 10.0),
        Observation(T0 + 5, None),
        Observation(T0 + 9, 30.5),
    ]


def test_only_the_newest_observations_are_kept() -> None:
    many = [[T0 + i, float(i)] for i in range(HISTORY_LIMIT + 5)]
    assert [o.at for o in observations_from_json(many)] == [T0 + i for i in range(5, HISTORY_LIMIT + 5)]
    history: list[Observation] = []
    for i in range(HISTORY_LIMIT + 3):
        history = remember(history, Observation(T0 + i, None))
    assert len(history) == HISTORY_LIMIT
    assert history[-1].at == T0 + HISTORY_LIMIT + 2


def test_incomplete_results_delay_grows_with_the_wait_up_to_fifteen_seconds() -> None:
    gaps = [incomplete_results_delay(5.0, waited) for waited in (0.0, 2.0, 6.0, 20.0, 45.0, 1e9)]
    assert gaps == [2.0, 2.0, 3.0, 10.0, 15.0, 15.0]
    assert incomplete_results_delay(5.0, math.nan) == 2.0
    assert incomplete_results_delay(5.0, -3.0) == 2.0


# -- POLL_PATIENCE -------------------------------------------------------------------------


def run_whole_percent_job(duration: float, patience: float) -> tuple[int, float]:
    """Polls and detection lag of a steady job reporting whole percents, as Check365 does."""
    history: list[Observation] = []
    t, polls = INITIAL, 0
    while True:
        polls += 1
        if t >= duration:
            return polls, t - duration
        history = remember(history, Observation(T0 + t, float(min(99, math.floor(100 * t / duration)))))
        t += next_poll_delay(
            history, now=T0 + t, started_at=T0, deadline=FAR, initial_delay=INITIAL, max_delay=MAX, patience=patience
        )


def test_patience_trades_polls_for_lag_on_a_steady_job() -> None:
    durations = [37.0, 190.0, 845.0, 2600.0, 6100.0]
    runs = {p: [run_whole_percent_job(d, p) for d in durations] for p in (0.1, DEFAULT_PATIENCE, 30.0)}
    polls = {p: sum(n for n, _ in r) for p, r in runs.items()}
    worst_lag = {p: max(lag for _, lag in r) for p, r in runs.items()}
    assert polls[0.1] > polls[DEFAULT_PATIENCE] > polls[30.0]
    assert worst_lag[0.1] <= 1.5
    # The most patient spends no more polls than a fixed 240 s interval after the first
    # poll, and still sees each completion within a quarter of the longest gap.
    assert polls[30.0] <= sum(1 + math.ceil((d - INITIAL) / 240) for d in durations)
    assert worst_lag[30.0] < MAX / 4


def test_patience_scales_the_gaps_of_a_stalled_job() -> None:
    history = [Observation(T0 + 5, 5.0), Observation(T0 + 35, 35.0), Observation(T0 + 40, 40.0)]
    history.append(Observation(T0 + 70, 40.0))
    gaps = [
        next_poll_delay(history, now=T0 + 70, started_at=T0, deadline=FAR, initial_delay=INITIAL, max_delay=MAX,
                        patience=p)
        for p in (0.25, 1.0, 4.0)
    ]  # fmt: skip
    assert gaps[0] < gaps[1] < gaps[2]
    assert gaps[1] == delay(history, T0 + 70)


@pytest.mark.parametrize("patience", [0.0, -1.0, math.nan, math.inf])
def test_patience_must_be_a_positive_number(patience: float) -> None:
    with pytest.raises(ValueError, match="patience"):
        next_poll_delay([], now=T0, started_at=T0, deadline=FAR, initial_delay=INITIAL, max_delay=MAX,
                        patience=patience)  # fmt: skip


def test_patience_scales_the_re_polls_of_a_short_answer() -> None:
    assert incomplete_results_delay(5.0, 20.0, 1.0) == incomplete_results_delay(5.0, 20.0)
    assert (
        incomplete_results_delay(5.0, 20.0, 0.1)
        < incomplete_results_delay(5.0, 20.0)
        < (incomplete_results_delay(5.0, 20.0, 4.0))
    )
    assert incomplete_results_delay(5.0, 20.0, 0.05) >= 1.0


def test_whole_percent_readings_that_wait_for_the_next_percent_are_no_pause() -> None:
    # 1 % per 60 s: two equal readings 10 s apart are a percent not yet ticked over,
    # not a stall, so the aim stays on the completion instead of growing stall gaps.
    history = [Observation(T0 + t, float(math.floor(t / 60))) for t in (5.0, 300.0, 5880.0, 5890.0)]
    got = delay(history, T0 + 5890)
    assert got <= 6000 - 5890 + 1


# -- whole percents and a history that keeps its reach -----------------------------------------


@pytest.mark.parametrize("duration", [4100.0, 6100.0, 7000.0])
def test_a_long_steady_job_reporting_whole_percents_is_seen_within_seconds(duration: float) -> None:
    # Taken at face value, a reading of 37 stands half a percent behind the job on
    # average: a 7,000 s job was then seen about 40 s late.
    _, lag = run_whole_percent_job(duration, 1.0)
    assert lag < 5


def test_equal_readings_do_not_push_out_how_the_job_got_there() -> None:
    history: list[Observation] = []
    for i, t in enumerate([5, 300, 600, 900, 1200, 1500, 1800, 2100]):
        history = remember(history, Observation(T0 + t, float(10 * i)))
    for k in range(1, 11):
        history = remember(history, Observation(T0 + 2100 + k, 70.0))
    assert len(history) <= HISTORY_LIMIT
    assert history[0].at <= T0 + 300
    assert [o.progress for o in history[-2:]] == [70.0, 70.0]
    assert history[-1].at == T0 + 2110


def test_a_close_scan_thins_the_history_instead_of_cutting_it() -> None:
    history: list[Observation] = []
    for i, t in enumerate([5, 300, 600, 900, 1200, 1500, 1800, 2100]):
        history = remember(history, Observation(T0 + t, float(10 * i)))
    for k in range(1, 11):  # a noisy job scanned every second near its end
        history = remember(history, Observation(T0 + 2100 + k, 97.0 + k % 2))
    # Cut, it would hold only the last 8 s; thinned, it still reaches back 300 s.
    assert len(history) == HISTORY_LIMIT
    assert history[0].at <= T0 + 1800
    assert history[-1].at == T0 + 2110
