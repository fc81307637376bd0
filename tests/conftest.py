"""Fixtures and hooks of the whole test suite (one conftest for every directory).

Integration tests share one system for the session: Redis, Check365, a receiver, a worker
and beat (``cluster``). Starting a worker costs about a second, and a flow's waits are
sub-second with the settings of ``tests.support.cluster.FAST_SETTINGS``, so the suite
shares one worker and one beat; a test that needs other settings starts its own worker on
its own queue, and a reliability scenario builds a system of its own (a module-scoped
``cluster`` that overrides this one). Every test uses its own job id and callback path, so
tests never read each other's webhooks.

The reliability scenarios (tests/reliability) each record a row; the rows are printed after
the test summary whenever scenarios ran. ``./dev reliability`` (``python -m
benchmarks.reliability``) runs that directory alone; ``./dev test`` and CI run it with
everything else. The table is also written, as JSON, to the file that ``RELIABILITY_JSON``
names: ``./dev reliability`` names benchmarks/results/reliability.json, so that the
committed table changes only when the suite is run for it. A failed test that used a
cluster gets the ends of its processes' logs attached.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import sys
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.reliability.scenario import ROWS, Row, format_table, row_recorder
from tests.support.cluster import Cluster, WorkerProcess
from tests.support.schemas import assert_events_valid

RESULTS_VARIABLE = "RELIABILITY_JSON"
COMMAND = "./dev reliability"
RELIABILITY = Path(__file__).parent / "reliability"

# Seconds spent in the reliability tests (setup, call and teardown): that suite's own wall
# time, also when it runs with every other test.
_SECONDS = pytest.StashKey[float]()

# The order of the issue these scenarios answer, which the table follows.
MODULE_ORDER = (
    "test_worker_crash",
    "test_redis_restart",
    "test_lost_messages",
    "test_check365_faults",
    "test_receiver_faults",
    "test_trickling",
    "test_ssrf",
    "test_hostile_messages",
)


def _in_reliability(item: pytest.Item) -> bool:
    return Path(str(item.fspath)).parent == RELIABILITY


# --- the shared system ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with Cluster() as started:
        # Started together: each waits for its own ready line.
        worker = started.start_worker("shared", concurrency=4, wait=False)
        beat = started.start_beat("shared-beat", wait=False)
        worker.wait_ready()
        beat.wait_ready()
        yield started


@pytest.fixture(scope="session")
def shared_worker(cluster: Cluster) -> WorkerProcess:
    return next(p for p in cluster.processes if p.name == "shared")


@pytest.fixture
def job_id(request: pytest.FixtureRequest) -> str:
    """A job id unique to this test run that still says which test it belongs to."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_"))[:60].strip("-")
    return f"it-{name}-{secrets.token_hex(3)}"


@pytest.fixture
def hook_path(job_id: str) -> str:
    return f"/hooks/{job_id}"


@pytest.fixture(autouse=True)
def no_crash_behind_the_scenes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a flow test whose job made a step crash, even if the system recovered and the test passed,
    or whose received events do not match their published JSON Schema."""
    names = request.fixturenames
    # A known bug's crash is the xfail's business, not a second failure.
    if "cluster" not in names or "job_id" not in names or request.node.get_closest_marker("xfail"):
        yield
        return
    # Taken before the test: fixtures are torn down before this one's teardown reads them.
    started: Cluster = request.getfixturevalue("cluster")
    job: str = request.getfixturevalue("job_id")
    path: str | None = request.getfixturevalue("hook_path") if "hook_path" in names else None
    yield
    crashes = started.error_records(job)
    assert not crashes, f"a step crashed: {[(name, r.get('event')) for name, r in crashes][:3]}"
    # Every event a flow received must match the JSON Schema of its type.
    if path is not None:
        received = [r for r in started.receiver.received(path) if r.verified]
        if received:
            assert_events_valid(received)


@pytest.fixture
def record_row(request: pytest.FixtureRequest) -> Callable[..., Row]:
    """Record this scenario's row; call it before asserting, so that a failed run still shows its numbers."""
    return row_recorder(request.config)


# --- hooks ---------------------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slots = [n for n, item in enumerate(items) if _in_reliability(item)]
    ours = [items[n] for n in slots]
    for item in ours:
        # Every scenario there runs real processes on real sockets.
        item.add_marker(pytest.mark.integration)

    def rank(item: pytest.Item) -> int:
        stem = Path(str(item.fspath)).stem
        return MODULE_ORDER.index(stem) if stem in MODULE_ORDER else len(MODULE_ORDER)

    # A stable sort keeps each module's own order (a module's last test may rely on it).
    for n, item in zip(slots, sorted(ours, key=rank), strict=True):
        items[n] = item


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if _in_reliability(item):
        item.config.stash[_SECONDS] = item.config.stash.get(_SECONDS, 0.0) + report.duration
    # A failure is explained by the processes' logs, not by the assertion: attach their ends.
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            started = value if isinstance(value, Cluster) else getattr(value, "cluster", None)
            if isinstance(started, Cluster):
                for process in started.processes:
                    report.sections.append((f"{process.name} log (last lines)", process.tail(40)))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    wall_s = config.stash.get(_SECONDS, 0.0)
    terminalreporter.write_sep("=", "reliability")
    for line in format_table(rows).splitlines():
        terminalreporter.write_line(line)
    target = os.environ.get(RESULTS_VARIABLE)
    saved = f"; saved to {target}" if target else ""
    terminalreporter.write_line(f"scenarios took {wall_s:.0f} s on {os.cpu_count()} cores{saved}")
    if not target:
        return
    results = Path(target)
    results.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": COMMAND,
        "generated_at": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "passed": exitstatus == 0,
        "wall_s": round(wall_s, 1),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": sys.platform,
        "columns": {
            "duplicates": "requests accepted (2xx) again for a webhook-id already accepted",
            "lost": "events that neither arrived nor are kept as dead letters (must be 0)",
            "recover_s": (
                "seconds from the fault to the last event received (the kill, the Redis crash, the deletion, "
                "the signal, the receiver's return, the replay); Check365 faults: the longest a webhook came "
                "after its job completed; slow receiver: the longest gap between a timed-out attempt and its retry"
            ),
        },
        "rows": [row.as_json() for row in rows],
    }
    results.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
