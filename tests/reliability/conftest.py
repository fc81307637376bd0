"""The reliability suite: each scenario records a row; the rows are printed and saved at the end.

``./dev reliability`` (``python -m benchmarks.reliability``) runs this directory alone;
``./dev test`` and CI run it with everything else. Whenever scenarios ran, the table is
printed after the test summary. It is also written, as JSON, to the file that
``RELIABILITY_JSON`` names: ``./dev reliability`` names benchmarks/results/reliability.json,
so that the committed table changes only when the suite is run for it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable, Generator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.reliability.scenario import ROWS, Row, format_table, row_recorder
from tests.support.cluster import Cluster

RESULTS_VARIABLE = "RELIABILITY_JSON"
COMMAND = "./dev reliability"

# Seconds spent in this directory's tests (setup, call and teardown): the suite's own wall
# time, also when it runs with every other test.
_SECONDS = pytest.StashKey[float]()
HERE = Path(__file__).parent

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slots = [n for n, item in enumerate(items) if Path(str(item.fspath)).parent == HERE]
    ours = [items[n] for n in slots]
    for item in ours:
        # Every scenario here runs real processes on real sockets.
        item.add_marker(pytest.mark.integration)

    def rank(item: pytest.Item) -> int:
        stem = Path(str(item.fspath)).stem
        return MODULE_ORDER.index(stem) if stem in MODULE_ORDER else len(MODULE_ORDER)

    # A stable sort keeps each module's own order (a module's last test may rely on it).
    for n, item in zip(slots, sorted(ours, key=rank), strict=True):
        items[n] = item


@pytest.fixture
def record_row(request: pytest.FixtureRequest) -> Callable[..., Row]:
    """Record this scenario's row; call it before asserting, so that a failed run still shows its numbers."""
    return row_recorder(request.config)


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if Path(str(item.fspath)).parent == HERE:
        item.config.stash[_SECONDS] = item.config.stash.get(_SECONDS, 0.0) + report.duration
    # A failed scenario is explained by its processes' logs: attach their ends.
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            cluster = value if isinstance(value, Cluster) else getattr(value, "cluster", None)
            if isinstance(cluster, Cluster):
                for process in cluster.processes:
                    report.sections.append((f"{process.name} log (last lines)", process.tail(40)))
    return report
