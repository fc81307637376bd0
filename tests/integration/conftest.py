"""One system for the whole integration session: Redis, Check365, a receiver, a worker and beat.

Starting a worker costs about a second, and a flow's waits are sub-second with the
settings of ``tests.support.cluster.FAST_SETTINGS``, so the suite shares one worker
and one beat; a test that needs other settings starts its own worker on its own
queue. Every test uses its own job id and callback path, so tests never read each
other's webhooks.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Generator, Iterator

import pytest

from tests.support.cluster import Cluster, WorkerProcess
from tests.support.schemas import assert_events_valid


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # A failed flow is explained by the worker's log, not by the assertion: attach its end.
    if report.failed and "cluster" in getattr(item, "fixturenames", ()):
        funcargs = getattr(item, "funcargs", {})
        started: Cluster | None = funcargs.get("cluster")
        for process in started.processes if started else []:
            report.sections.append((f"{process.name} log (last lines)", process.tail(40)))
    return report
