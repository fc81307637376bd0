"""The Check365 simulator answers like the reference page and injects the faults it is asked for.

Jobs follow an injected clock, so progress and Retry-After are tested without sleeping.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.local.simulator import (
    BEHAVIOURS,
    STATUS_PATH,
    FaultPlan,
    SimJob,
    Simulator,
    generate_results,
    max_in_window,
)

KEY = "test-api-key"
ROOT = Path(__file__).resolve().parents[2]
# Loading CA certificates is most of the cost of a new httpx.Client; every test makes one.
TLS = ssl.create_default_context()


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[Simulator]:
    with Simulator(KEY, clock=clock) as simulator:
        yield simulator


@pytest.fixture
def client(sim: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10, verify=TLS) as c:
        yield c


def status(client: httpx.Client, job_id: str | None, api_key: str | None = KEY) -> httpx.Response:
    params = {k: v for k, v in (("api_key", api_key), ("job_id", job_id)) if v is not None}
    return client.get(STATUS_PATH, params=params)


def data(client: httpx.Client, job_id: str) -> dict[str, object]:
    response = status(client, job_id)
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert isinstance(body["data"], dict)
    return body["data"]


# --------------------------------------------------------------------------- the documented API


def test_progress_grows_with_time_then_the_job_completes(
    sim: Simulator, client: httpx.Client, clock: FakeClock
) -> None:
    sim.add_job("J-1", size=10, duration_s=10.0)

    first = status(client, "J-1").json()
    assert first["success"] is True
    assert isinstance(first["message"], str)
    assert first["data"] == {
        "jobId": "J-1", "status": "processing", "creditsUsed": 0, "progress": 0, "total": 10, "results": [],
    }  # fmt: skip

    clock.advance(2.5)
    quarter = data(client, "J-1")
    assert (quarter["status"], quarter["progress"], quarter["creditsUsed"]) == ("processing", 25, 2)

    clock.advance(7.0)
    assert data(client, "J-1")["progress"] == 95

    clock.advance(0.5)
    done = status(client, "J-1").json()
    assert done["message"] == "Job has been completed"
    assert done["data"]["status"] == "completed"
    assert done["data"]["progress"] == 100
    assert done["data"]["creditsUsed"] == 10
    assert done["data"]["total"] == 10
    assert len(done["data"]["results"]) == 10


def test_a_zero_duration_job_is_completed_at_once(sim: Simulator, client: httpx.Client) -> None:
    sim.add_job("J-0", size=3, duration_s=0)
    assert data(client, "J-0")["status"] == "completed"


@pytest.mark.parametrize("api_key", ["wrong-key", "", None])
def test_a_wrong_or_missing_api_key_is_401(sim: Simulator, client: httpx.Client, api_key: str | None) -> None:
    sim.add_job("J-1", size=1, duration_s=0)
    response = status(client, "J-1", api_key=api_key)
    assert response.status_code == 401
    assert response.json() == {"success": False, "message": "Invalid API key"}


def test_an_unknown_job_is_404(client: httpx.Client) -> None:
    response = status(client, "no-such-job")
    assert response.status_code == 404
    assert response.json() == {"success": False, "message": "Job not found"}


def test_a_missing_job_id_is_400(client: httpx.Client) -> None:
    response = status(client, None)
    assert response.status_code == 400
    assert response.json()["success"] is False


@pytest.mark.parametrize(
    ("job_id", "size", "duration"),
    [
        ("sim-250-3s", 250, 3.0),
        ("sim-250-3s-a", 250, 3.0),
        ("sim-10-0.5s", 10, 0.5),
        ("sim-7-2s-x-y", 7, 2.0),
    ],
)
def test_sim_ids_are_created_on_first_request(
    client: httpx.Client, clock: FakeClock, job_id: str, size: int, duration: float
) -> None:
    running = data(client, job_id)
    assert (running["status"], running["total"], running["results"]) == ("processing", size, [])

    clock.advance(duration * 0.99)
    assert data(client, job_id)["status"] == "processing"

    clock.advance(duration * 0.01)
    done = data(client, job_id)
    assert done["status"] == "completed"
    assert isinstance(done["results"], list)
    assert len(done["results"]) == size


@pytest.mark.parametrize("job_id", ["sim-", "sim-10", "sim-10-3", "sim-x-3s", "sim-10-3m", "sim-10000000-1s"])
def test_ids_that_do_not_follow_the_pattern_are_not_created(client: httpx.Client, job_id: str) -> None:
    assert status(client, job_id).status_code == 404


def test_a_sim_id_suffix_naming_a_behaviour_selects_it(client: httpx.Client, clock: FakeClock) -> None:
    data(client, "sim-5-1s-fail-7")
    clock.advance(1)
    assert data(client, "sim-5-1s-fail-7")["status"] == "failed"


# --------------------------------------------------------------------------- behaviours


def test_fail_reports_a_failed_status_inside_a_successful_answer(
    sim: Simulator, client: httpx.Client, clock: FakeClock
) -> None:
    sim.add_job("J-f", size=4, duration_s=2, behaviour="fail")
    assert data(client, "J-f")["status"] == "processing"
    clock.advance(2)
    body = status(client, "J-f").json()
    assert body["success"] is True
    assert body["message"] == "Job failed"
    assert body["data"]["status"] == "failed"
    assert body["data"]["results"] == []


def test_never_stays_processing_with_stalled_progress(sim: Simulator, client: httpx.Client, clock: FakeClock) -> None:
    sim.add_job("J-n", size=4, duration_s=2, behaviour="never")
    clock.advance(1)
    assert data(client, "J-n")["progress"] == 50
    clock.advance(10_000)
    later = data(client, "J-n")
    clock.advance(1_000_000)
    much_later = data(client, "J-n")
    assert later["status"] == much_later["status"] == "processing"
    assert later["progress"] == much_later["progress"]
    assert isinstance(later["progress"], int)
    assert 50 < later["progress"] < 100


def test_unknown_statuses_walk_through_odd_states_before_completing(
    sim: Simulator, client: httpx.Client, clock: FakeClock
) -> None:
    sim.add_job("J-u", size=3, duration_s=8, behaviour="unknown_statuses")
    seen: list[object] = []
    for _ in range(9):
        current = data(client, "J-u")["status"]
        if not seen or seen[-1] != current:
            seen.append(current)
        clock.advance(1)
    assert seen == ["queued", "validating", "finalizing", "completed"]


def test_late_results_are_short_for_two_polls_and_a_second_then_complete(
    sim: Simulator, client: httpx.Client, clock: FakeClock
) -> None:
    sim.add_job("J-l", size=10, duration_s=1, behaviour="late_results")
    clock.advance(1)
    short = [data(client, "J-l") for _ in range(3)]
    for answer in short:
        assert answer["status"] == "completed"
        assert answer["total"] == 10
        assert isinstance(answer["results"], list)
        assert len(answer["results"]) < 10
    clock.advance(1)
    full = data(client, "J-l")
    assert full["results"] == generate_results("J-l", 10)


def test_late_results_stay_short_for_two_polls_even_if_polled_late(
    sim: Simulator, client: httpx.Client, clock: FakeClock
) -> None:
    sim.add_job("J-l", size=10, duration_s=1, behaviour="late_results")
    clock.advance(60)
    lengths = [len(data(client, "J-l")["results"]) for _ in range(3)]
    assert lengths == [5, 5, 10]


def test_every_behaviour_is_accepted_and_others_are_refused(sim: Simulator) -> None:
    for behaviour in BEHAVIOURS:
        assert sim.add_job(f"J-{behaviour}", 1, 1, behaviour).behaviour == behaviour
    with pytest.raises(ValueError, match="behaviour"):
        sim.add_job("J-x", 1, 1, "sometimes")
    with pytest.raises(ValueError, match="size"):
        SimJob("J-y", -1, 1)


# --------------------------------------------------------------------------- faults


def always(kind: str, **kwargs: float) -> FaultPlan:
    return FaultPlan(rate=1.0, kinds=(kind,), seed=1, **kwargs)


def test_5xx_fault_is_a_503_with_a_json_error(sim: Simulator, client: httpx.Client) -> None:
    sim.add_job("J-1", 1, 0)
    sim.set_faults(always("5xx"))
    response = status(client, "J-1")
    assert response.status_code == 503
    assert response.json()["success"] is False
    assert sim.requests()[-1].fault == "5xx"


@pytest.mark.parametrize(("retry_after", "header"), [(2.0, "2"), (0.5, "0.5"), (30, "30")])
def test_429_fault_carries_retry_after(sim: Simulator, client: httpx.Client, retry_after: float, header: str) -> None:
    sim.set_faults(always("429", retry_after_s=retry_after))
    response = status(client, "sim-1-1s")
    assert response.status_code == 429
    assert response.headers["retry-after"] == header
    assert sim.requests()[-1].fault == "429"


def test_slow_fault_still_answers_normally(sim: Simulator, client: httpx.Client) -> None:
    sim.add_job("J-1", 2, 0)
    sim.set_faults(always("slow", slow_s=0.01))
    assert len(data(client, "J-1")["results"]) == 2
    assert sim.requests()[-1].fault == "slow"
    assert sim.requests()[-1].status_code == 200


def test_malformed_fault_is_a_200_that_is_not_json(sim: Simulator, client: httpx.Client) -> None:
    sim.add_job("J-1", 2, 0)
    sim.set_faults(always("malformed"))
    for _ in range(4):
        response = status(client, "J-1")
        assert response.status_code == 200
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(response.content)
    assert {r.fault for r in sim.requests()} == {"malformed"}


def test_success_false_fault_is_an_error_inside_a_200(sim: Simulator, client: httpx.Client) -> None:
    sim.add_job("J-1", 2, 0)
    sim.set_faults(always("success_false"))
    response = status(client, "J-1")
    assert response.status_code == 200
    assert response.json() == {"success": False, "message": "Temporary error, try again"}


def test_truncated_fault_cuts_the_results_of_a_completed_job(
    sim: Simulator, client: httpx.Client, clock: FakeClock
) -> None:
    sim.add_job("J-1", 9, 1)
    sim.set_faults(always("truncated"))
    assert data(client, "J-1")["status"] == "processing"
    assert sim.requests()[-1].fault is None  # nothing to cut yet

    clock.advance(1)
    cut = data(client, "J-1")
    assert cut["status"] == "completed"
    assert cut["total"] == 9
    assert len(cut["results"]) < 9
    assert sim.requests()[-1].fault == "truncated"

    sim.set_faults(None)
    assert len(data(client, "J-1")["results"]) == 9


def test_drop_fault_closes_the_connection_without_an_answer(sim: Simulator, client: httpx.Client) -> None:
    sim.add_job("J-1", 1, 0)
    sim.set_faults(always("drop"))
    with pytest.raises(httpx.RemoteProtocolError):
        status(client, "J-1")
    last = sim.requests()[-1]
    assert (last.job_id, last.status_code, last.fault) == ("J-1", 0, "drop")

    sim.set_faults(None)
    assert status(client, "J-1").status_code == 200


def test_faults_follow_their_seed_and_rate(clock: FakeClock) -> None:
    def faults_seen(seed: int) -> list[str | None]:
        with Simulator(KEY, clock=clock) as s, httpx.Client(base_url=s.url, verify=TLS) as c:
            s.add_job("J-1", 1, 0)
            s.set_faults(FaultPlan(rate=0.5, kinds=("5xx", "success_false"), seed=seed))
            for _ in range(40):
                status(c, "J-1")
            return [r.fault for r in s.requests()]

    first, again, other = faults_seen(7), faults_seen(7), faults_seen(8)
    assert first == again
    assert first != other
    assert set(first) == {None, "5xx", "success_false"}


def test_a_fault_plan_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="rate"):
        FaultPlan(rate=1.5)
    with pytest.raises(ValueError, match="kinds"):
        FaultPlan(rate=0.5, kinds=("gremlins",))
    with pytest.raises(ValueError, match="retry_after_s"):
        FaultPlan(rate=0.5, retry_after_s=-1)


# --------------------------------------------------------------------------- Retry-After tracking


def test_requests_before_retry_after_passed_are_violations(
    sim: Simulator, client: httpx.Client, clock: FakeClock
) -> None:
    sim.add_job("J-1", 1, 0)
    sim.add_job("J-2", 1, 0)
    sim.set_faults(always("429", retry_after_s=2))
    assert status(client, "J-1").status_code == 429
    sim.set_faults(None)
    assert sim.retry_after_violations() == 0

    clock.advance(1.5)
    # The block is per API key, not per job: another job of the same pool is throttled too.
    early = status(client, "J-2")
    assert early.status_code == 429
    assert early.headers["retry-after"] == "0.5"
    assert sim.requests()[-1].fault == "blocked"
    assert sim.retry_after_violations() == 1

    # Another key is not blocked by it (and is refused only for being wrong).
    assert status(client, "J-2", api_key="other-key").status_code == 401
    assert sim.retry_after_violations() == 1

    clock.advance(0.5)
    assert status(client, "J-2").status_code == 200
    assert sim.retry_after_violations() == 1


# --------------------------------------------------------------------------- request log and rates


def test_requests_are_logged_with_their_outcome(sim: Simulator, client: httpx.Client) -> None:
    sim.add_job("J-1", 1, 0)
    status(client, "J-1")
    status(client, "nope")
    status(client, "J-1", api_key="bad")
    client.get("/_sim/stats")  # control requests are not status requests
    assert [(r.job_id, r.status_code, r.fault) for r in sim.requests()] == [
        ("J-1", 200, None),
        ("nope", 404, None),
        ("J-1", 401, None),
    ]


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ([], 0),
        ([5.0], 1),
        ([0.0, 0.5, 0.99, 1.0], 3),
        ([0.0, 1.0, 2.0], 1),
        ([3.0, 0.1, 0.2, 2.95, 3.5, 3.9], 4),
    ],
)
def test_max_in_window_examples(times: list[float], expected: int) -> None:
    assert max_in_window(times) == expected


@given(
    st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=60),
    st.floats(min_value=0.01, max_value=10),
)
def test_max_in_window_matches_counting_every_window(times: list[float], window: float) -> None:
    # Some densest window starts at one of the times.
    brute = max((sum(1 for u in times if t <= u < t + window) for t in times), default=0)
    assert max_in_window(times, window) == brute


def test_stats_report_the_busiest_second(sim: Simulator, client: httpx.Client, clock: FakeClock) -> None:
    sim.add_job("J-1", 1, 0)
    for step in (0.0, 0.2, 0.2, 0.2, 1.0, 0.1):
        clock.advance(step)
        status(client, "J-1")
    assert client.get("/_sim/stats").json() == {
        "requests": 6,
        "retry_after_violations": 0,
        "per_second_max": 4,
    }


# --------------------------------------------------------------------------- results

EMAIL = re.compile(r"[a-z0-9._+]+@[a-z0-9.-]+\.[a-z]{2,}")
ROLE_LOCALS = {"info", "sales", "support", "admin", "contact", "billing", "hr", "office", "noreply", "team"}


def test_results_are_deterministic_per_job_id() -> None:
    assert generate_results("J-42", 50) == generate_results("J-42", 50)
    assert generate_results("J-42", 50) != generate_results("J-43", 50)
    # A longer job of the same id starts with the same results.
    assert generate_results("J-42", 80)[:50] == generate_results("J-42", 50)


def test_results_are_realistic_and_typed_as_the_reference_says() -> None:
    results = generate_results("J-realism", 2000)
    assert len({r["email"] for r in results}) == len(results)
    for r in results:
        assert list(r) == [
            "email", "emailProvider", "emailType", "status", "safeToSend", "risk", "isRole", "statusReason",
        ]  # fmt: skip
        assert isinstance(r["email"], str)
        assert EMAIL.fullmatch(r["email"]), r
        assert isinstance(r["safeToSend"], bool)
        assert isinstance(r["isRole"], bool)
        assert r["emailType"] in {"personal", "professional", "unknown"}
        assert r["risk"] in {"low", "medium", "high"}
        assert r["safeToSend"] is (r["status"] == "valid" and r["risk"] == "low")
        assert r["isRole"] is (r["email"].split("@")[0] in ROLE_LOCALS)
        if r["status"] == "unvalidated":
            assert (r["emailProvider"], r["statusReason"]) == ("unknown", "invalid_domain")
    statuses = {r["status"] for r in results}
    assert statuses == {"valid", "invalid", "catch_all", "unknown", "unvalidated"}
    providers = {r["emailProvider"] for r in results}
    assert {"google_workspace", "microsoft365", "gmail", "outlook", "yahoo", "unknown"} <= providers
    reasons = {r["statusReason"] for r in results}
    assert reasons == {"accepted_email", "invalid_domain", "mailbox_not_found", "catch_all_domain"} | {
        "role_account",
        "unknown",
    }


def test_the_served_results_are_the_generated_ones_every_time(sim: Simulator, client: httpx.Client) -> None:
    sim.add_job("J-7", 25, 0)
    first = status(client, "J-7")
    assert first.json()["data"]["results"] == generate_results("J-7", 25)
    assert status(client, "J-7").content == first.content


def test_a_100000_result_job_is_served(sim: Simulator, client: httpx.Client) -> None:
    sim.add_job("J-big", 100_000, 0)
    body = orjson.loads(status(client, "J-big").content)
    assert body["data"]["total"] == 100_000
    assert len(body["data"]["results"]) == 100_000


# --------------------------------------------------------------------------- control surface and lifecycle


def test_control_surface_registers_jobs_and_faults_and_reports(client: httpx.Client, clock: FakeClock) -> None:
    created = client.post("/_sim/jobs", json={"job_id": "J-c", "size": 3, "duration_s": 1, "behaviour": "fail"})
    assert created.status_code == 201
    assert created.json()["behaviour"] == "fail"
    clock.advance(1)
    assert data(client, "J-c")["status"] == "failed"

    assert client.post("/_sim/faults", json={"rate": 1.0, "kinds": ["5xx"], "seed": 3}).status_code == 200
    assert status(client, "J-c").status_code == 503
    assert client.post("/_sim/faults", json={}).status_code == 200
    assert status(client, "J-c").status_code == 200

    log = client.get("/_sim/requests").json()
    assert [(r["job_id"], r["status_code"], r["fault"]) for r in log] == [
        ("J-c", 200, None),
        ("J-c", 503, "5xx"),
        ("J-c", 200, None),
    ]
    assert all(isinstance(r["at"], float) for r in log)
    assert client.get("/_sim/stats").json()["requests"] == 3


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/_sim/jobs", {"job_id": "J", "size": 1}),
        ("/_sim/jobs", {"job_id": "J", "size": 1, "duration_s": 1, "behaviour": "odd"}),
        ("/_sim/faults", {"rate": 2}),
        ("/_sim/faults", [1, 2]),
    ],
)
def test_control_surface_refuses_bad_bodies(client: httpx.Client, path: str, payload: object) -> None:
    response = client.post(path, json=payload)
    assert response.status_code == 400
    assert response.json()["success"] is False


def test_stop_closes_kept_alive_connections(clock: FakeClock) -> None:
    simulator = Simulator(KEY, clock=clock).start()
    with httpx.Client(base_url=simulator.url, verify=TLS) as c:
        assert status(c, "sim-1-0s").status_code == 200
        simulator.stop()
        with pytest.raises(httpx.TransportError):
            status(c, "sim-1-0s")


def test_the_url_needs_a_started_simulator() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = Simulator(KEY).url


def test_the_simulator_imports_without_celery() -> None:
    code = "import sys, worker.local.simulator; sys.exit('celery' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_a_rotated_key_refuses_the_old_one(client: httpx.Client) -> None:
    assert status(client, "sim-1-0s").status_code == 200
    assert client.post("/_sim/key", json={"api_key": "rotated"}).status_code == 200
    refused = status(client, "sim-1-0s")
    assert refused.status_code == 401
    assert refused.json() == {"success": False, "message": "Invalid API key"}
    assert status(client, "sim-1-0s", api_key="rotated").status_code == 200
    assert client.post("/_sim/key", json={"api_key": ""}).status_code == 400


def test_a_path_it_does_not_serve_gets_a_web_servers_html_404(client: httpx.Client) -> None:
    # What a CHECK365_BASE_URL one path segment off meets.
    response = client.get("/v2" + STATUS_PATH, params={"api_key": KEY, "job_id": "sim-1-0s"})
    assert response.status_code == 404
    assert response.headers["content-type"] == "text/html"
    assert b"<h1>404 Not Found</h1>" in response.content


def _readme_simulator_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("### The local Check365 simulator")
    return text[start : text.index("\n#", start + 1)]


def test_the_readme_documents_every_behaviour_and_the_default_key() -> None:
    section = _readme_simulator_section()
    for behaviour in BEHAVIOURS:
        assert f"`{behaviour}`" in section, behaviour
    assert "**`demo-key`**" in section
    assert "`/_sim/jobs`" in section or "POST /_sim/jobs" in section
    assert "--profile demo" in section


def test_the_readmes_example_job_ids_are_created_as_it_says(client: httpx.Client, clock: FakeClock) -> None:
    ids = set(re.findall(r"\bsim-\d+-[\d.]+s(?:-[A-Za-z_]+(?:-\d+)?)?", _readme_simulator_section()))
    assert {"sim-2500-30s", "sim-10-5s-fail", "sim-3-0s"} <= ids
    for job_id in sorted(ids):
        answer = status(client, job_id)
        assert answer.status_code == 200, job_id
        size, seconds = re.match(r"sim-(\d+)-([\d.]+)s", job_id).groups()  # type: ignore[union-attr]
        data = answer.json()["data"]
        assert data["total"] == int(size), job_id
        assert (data["status"] == "completed") == (float(seconds) == 0), job_id
    clock.now += 60
    assert status(client, "sim-10-5s-fail").json()["data"]["status"] == "failed"
    assert status(client, "sim-2500-30s").json()["data"]["status"] == "completed"
    assert status(client, "J-42").status_code == 404
