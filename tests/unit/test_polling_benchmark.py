"""The schedule benchmark's virtual jobs and its frontier, on a tiny seeded workload (no timing)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from benchmarks import polling


def test_virtual_jobs_report_whole_percents_below_100_as_check365_does() -> None:
    rng = random.Random(4)
    for job in polling.make_jobs(300, rng):
        end = job.duration or polling.DEADLINE_S
        for t in (1.0, end / 3, end * 0.999):
            got = polling._reported(job, t, rng)
            assert got is None or (got == int(got) and 0 <= got <= 99)


def test_some_virtual_jobs_complete_short_of_their_total_and_one_kind_stays_short() -> None:
    jobs = polling.make_jobs(2000, random.Random(5))
    late = [j for j in jobs if 0 < j.results_after < math.inf]
    never = [j for j in jobs if j.results_after == math.inf]
    assert late and never
    assert all(j.duration is not None for j in late + never)
    # A job that stays short is delivered as it is once the worker's wait is over.
    job = never[0]
    assert job.duration is not None
    outcome = polling._finish_short(job, job.duration + 3.0, 1)
    assert outcome.polls > 1
    assert outcome.lag is not None and 0 <= outcome.lag <= 15.0


def test_frontier_has_every_profile_each_patience_and_each_interval(tmp_path: Path) -> None:
    patiences, intervals = (0.5, 1.0, 8.0), (5.0, 60.0, 300.0)
    figures = polling.frontier(jobs=150, seed=3, patiences=patiences, intervals=intervals)
    assert set(figures["profiles"]) == {"linear", "stalling", "bursty", "noisy", "mixed"}
    for name, entry in figures["profiles"].items():
        assert [p["patience"] for p in entry["ours"]] == list(patiences)
        assert [c["interval_s"] for c in entry["fixed"]] == list(intervals)
        for point in entry["ours"] + entry["fixed"]:
            assert point["polls"] >= 1
        for c in entry["fixed"]:
            assert set(c["dominated_by"]) <= set(patiences)
        if name in polling.DOMINANCE_PROFILES:
            assert entry["misses"] == [c["interval_s"] for c in entry["fixed"] if not c["dominated_by"]]
        if name in polling.WITHIN_PROFILES:
            assert entry["misses"] == [p["patience"] for p in entry["ours"] if not p["within"]]
    # A fixed interval's polls fall as its interval grows, on the same jobs.
    mixed = figures["profiles"]["mixed"]["fixed"]
    assert mixed[0]["polls"] > mixed[1]["polls"] > mixed[2]["polls"]
    text = polling.format_frontier(figures)
    assert "linear" in text and "fixed interval" in text


def test_frontier_command_writes_its_json_and_figure(tmp_path: Path) -> None:
    assert polling.main(["--frontier", "--jobs", "60", "--seed", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "frontier.json").read_text())
    assert data["settings"]["jobs"] == 60
    assert data["profiles"]["mixed"]["ours"][0]["patience"] == polling.PATIENCES[0]
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fixed_lag_is_interpolated_on_log_log_axes() -> None:
    curve = [{"polls": 10.0, "lag_p95_s": 100.0}, {"polls": 100.0, "lag_p95_s": 10.0}]
    assert math.isclose(polling.fixed_lag_at(curve, 10.0) or 0.0, 100.0)
    got = polling.fixed_lag_at(curve, math.sqrt(1000.0))
    assert got is not None and math.isclose(got, math.sqrt(1000.0))
    assert polling.fixed_lag_at(curve, 5.0) is None
