"""What the reliability scenarios share: their settings, the tally of webhooks, the table row.

Each scenario builds a whole system (``tests.support.cluster.Cluster``), breaks something
on purpose, and then checks what the contract promises: every event arrives, a repeat only
ever carries the same ``webhook-id``, and recovery takes no longer than the settings allow.
It records one ``Row``; the suite prints them as a table at the end (see tests/conftest.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest

from tests.support.cluster import Cluster, wait_until
from tests.support.settings import make_settings
from worker.local.receiver import Received
from worker.local.simulator import generate_results
from worker.runtime.leases import delivery_lease_s, watch_lease_s

# Recovery bounds get this much on top of the bound the settings imply: the machine
# running the suite may have two cores and other heavy work on them.
SLACK_S = 20.0


def longest_lease_s(env: Mapping[str, str]) -> float:
    """The longest an interrupted step can hold its watch or event under these settings."""
    settings = make_settings(env, process="cli")
    return max(watch_lease_s(settings), delivery_lease_s(settings))


@dataclass(frozen=True)
class Row:
    """One line of the reliability table."""

    scenario: str
    jobs: int
    events_expected: int
    delivered: int
    duplicates: int  # requests accepted (2xx) again for a webhook-id already accepted
    lost: int  # events that neither arrived nor are kept as dead letters: must be 0
    recover_s: float | None  # from the fault to the last event received (None: nothing to recover)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["recover_s"] = None if self.recover_s is None else round(self.recover_s, 1)
        return out


# Where the rows of a session are kept (pytest's stash of the run's config).
ROWS = pytest.StashKey[list[Row]]()


def row_recorder(config: pytest.Config) -> Callable[..., Row]:
    """A function that records a row for the table; fixtures of any scope use it via their request."""

    def record(
        scenario: str,
        *,
        jobs: int,
        events_expected: int,
        delivered: int,
        duplicates: int,
        lost: int,
        recover_s: float | None,
    ) -> Row:
        row = Row(scenario, jobs, events_expected, delivered, duplicates, lost, recover_s)
        config.stash.setdefault(ROWS, []).append(row)
        return row

    return record


COLUMNS = ("scenario", "jobs", "events expected", "delivered", "duplicate deliveries", "lost", "recover s")


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (readable as plain text too)."""
    cells = [
        [
            r.scenario,
            str(r.jobs),
            str(r.events_expected),
            str(r.delivered),
            str(r.duplicates),
            str(r.lost),
            "-" if r.recover_s is None else f"{r.recover_s:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]

    def line(values: Sequence[str]) -> str:
        # The scenario reads best left-aligned, the numbers right-aligned.
        padded = [v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(COLUMNS), rule, *(line(row) for row in cells)])


# --------------------------------------------------------------------------- tallying webhooks


@dataclass
class Tally:
    """The requests a receiver accepted (answered 2xx), by webhook-id."""

    accepted: dict[str, list[Received]] = field(default_factory=dict)

    @property
    def delivered(self) -> int:
        return len(self.accepted)

    @property
    def duplicates(self) -> int:
        return sum(len(requests) - 1 for requests in self.accepted.values())

    def first_arrivals(self) -> list[float]:
        return [requests[0].at for requests in self.accepted.values()]

    def last_arrival(self) -> float:
        """When the last event arrived for the first time."""
        return max(self.first_arrivals())


def tally(received: Iterable[Received], paths: Iterable[str] | None = None) -> Tally:
    wanted = None if paths is None else set(paths)
    out = Tally()
    for request in received:
        if (wanted is None or request.path in wanted) and 200 <= request.status_sent < 300:
            out.accepted.setdefault(request.headers.get("webhook-id", ""), []).append(request)
    return out


def accepted_ids_by_path(received: Iterable[Received], paths: Iterable[str]) -> dict[str, set[str]]:
    """The webhook-ids each path accepted; a path that accepted none maps to an empty set."""
    out: dict[str, set[str]] = {path: set() for path in paths}
    for request in received:
        if request.path in out and 200 <= request.status_sent < 300:
            out[request.path].add(request.headers.get("webhook-id", ""))
    return out


def all_paths_delivered(received: Iterable[Received], paths: Iterable[str]) -> bool:
    return all(accepted_ids_by_path(received, paths).values())


def check_completed_deliveries(cluster: Cluster, jobs: Mapping[str, int], path_of: Mapping[str, str]) -> Tally:
    """Assert what every scenario promises for jobs that complete, and return the tally.

    ``jobs`` maps each job id to its size, ``path_of`` each job id to its callback path.
    Every job's path accepted exactly one webhook-id (a repeat carries the same one and the
    same signed bytes), every request verified, and the results are Check365's, in order.
    """
    received = cluster.receiver.received()
    paths = [path_of[job] for job in jobs]
    by_path = accepted_ids_by_path(received, paths)
    missing = sorted(path for path, ids in by_path.items() if not ids)
    assert not missing, f"{len(missing)} job(s) never delivered, e.g. {missing[:5]}"
    doubled = {path: ids for path, ids in by_path.items() if len(ids) > 1}
    assert not doubled, f"one event arrived under several webhook-ids: {list(doubled.items())[:3]}"

    result = tally(received, paths)
    unverified = [r.headers.get("webhook-id") for rs in result.accepted.values() for r in rs if not r.verified]
    assert not unverified, f"signature verification failed for {unverified[:5]}"
    for webhook_id, requests in result.accepted.items():
        assert len({r.body for r in requests}) == 1, f"{webhook_id}: a repeat must carry the same signed bytes"
    job_of = {path: job for job, path in path_of.items()}
    for webhook_id, requests in result.accepted.items():
        body = json.loads(requests[0].body)
        job = job_of[requests[0].path]
        assert body["type"] == "bulk_validation.completed", f"{job}: {body['type']} ({body['data']})"
        assert body["data"]["jobId"] == job
        assert body["data"]["results"] == generate_results(job, jobs[job]), f"{job} ({webhook_id}): wrong results"
    return result


def watch_outcomes(cluster: Cluster, jobs: Iterable[str]) -> dict[str, list[str | None]]:
    """Each job's watches' outcomes (None while active)."""
    return {job: [w.outcome for w in cluster.watch_state(job)] for job in jobs}


def wait_settled(cluster: Cluster, jobs: Iterable[str], timeout: float) -> None:
    """Wait until every job has a finished watch and no event is left to deliver.

    Once the outbox holds nothing pending, no further request can come: a repeat is only
    ever sent for an event not yet recorded as delivered.
    """
    wanted = list(jobs)

    def settled() -> bool:
        if cluster.active_watch_count() or cluster.pending_event_count():
            return False
        return all(outcomes and None not in outcomes for outcomes in watch_outcomes(cluster, wanted).values())

    wait_until(settled, timeout, "every watch finished and every event delivered", interval=0.2)
