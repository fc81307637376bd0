"""A local Check365 simulator for the demo and the integration tests.

It answers ``GET /api/validation/bulk-status`` the way the API reference page
describes, for jobs whose progress follows the clock, and can inject the faults a
poller must survive (5xx, 429 with Retry-After, slow or garbled answers, errors
inside HTTP 200, short result lists, dropped connections). It records every
status request so that tests can check the pool's request rate and its respect
of Retry-After across processes.

Any other path gets a web server's HTML 404 page, as a ``CHECK365_BASE_URL`` one path
segment off would meet in front of the real API.

Only built-in modules and orjson are used, so the simulator runs anywhere the
package is installed, without Celery or Redis.

Control surface for tests that run the worker in other processes (unauthenticated;
the simulator is a loopback test tool):

    POST /_sim/jobs       {"job_id", "size", "duration_s", "behaviour"}  register a job
    POST /_sim/faults     FaultPlan fields, or {} to clear
    POST /_sim/key        {"api_key"}: the key accepted from now on (a rotated key)
    GET  /_sim/requests   the request log
    GET  /_sim/stats      {"requests", "retry_after_violations", "per_second_max"}
"""

from __future__ import annotations

import functools
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import orjson

from worker.local.httpserver import NO_LATENCY, Latency, LocalServer, QuietHandler, ServerThread

STATUS_PATH = "/api/validation/bulk-status"
BEHAVIOURS = ("normal", "fail", "never", "unknown_statuses", "late_results")
FAULT_KINDS = ("5xx", "429", "slow", "malformed", "success_false", "truncated", "drop")

# A "never" job stalls here: progress that looked alive, then stops short of 100,
# which is what a stuck job looks like to a poller.
NEVER_STALL_PROGRESS = 87
# "late_results" answers a short list for at least this long and this many polls
# after completing, so that any poller meets the case before the full list appears.
LATE_RESULTS_S = 1.0
LATE_RESULTS_POLLS = 2
# Ids are auto-created from their text; the cap keeps a typo from eating memory.
MAX_AUTO_SIZE = 1_000_000
# Bodies posted to the control surface are small JSON objects.
MAX_CONTROL_BODY = 1 << 20

_AUTO_ID = re.compile(r"sim-(\d{1,7})-(\d{1,6}(?:\.\d+)?)s(?:-(.+))?")
_CLOSE_NOW = -1  # a status code meaning "close the connection without answering"


# --------------------------------------------------------------------------- jobs and faults


@dataclass
class SimJob:
    job_id: str
    size: int
    duration_s: float
    behaviour: str = "normal"
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ValueError("job_id must not be empty")
        if self.size < 0:
            raise ValueError(f"size must be at least 0, got {self.size}")
        if not math.isfinite(self.duration_s) or self.duration_s < 0:
            raise ValueError(f"duration_s must be a finite number >= 0, got {self.duration_s}")
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {', '.join(BEHAVIOURS)}, got {self.behaviour!r}")


@dataclass(frozen=True)
class FaultPlan:
    """Each status request meets a fault with probability ``rate``, its kind drawn from ``kinds``."""

    rate: float
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    slow_s: float = 0.5
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be between 0 and 1, got {self.rate}")
        unknown = [k for k in self.kinds if k not in FAULT_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty selection of {', '.join(FAULT_KINDS)}")
        for name in ("slow_s", "retry_after_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> FaultPlan | None:
        """The plan described by a control-surface body; ``{}`` means no faults."""
        if not payload:
            return None
        fields = {k: payload[k] for k in ("rate", "kinds", "seed", "slow_s", "retry_after_s") if k in payload}
        if "kinds" in fields:
            fields["kinds"] = tuple(fields["kinds"])
        return cls(**fields)


@dataclass(frozen=True)
class SimRequest:
    at: float
    job_id: str
    status_code: int  # 0 when the connection was dropped without an answer
    fault: str | None  # a FAULT_KINDS entry, "blocked" for a Retry-After violation, or None


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _View:
    message: str
    status: str
    progress: int
    results: Literal["none", "full"]


def _view_job(job: SimJob, now: float) -> _View:
    """What Check365 says about ``job`` at time ``now`` (before any short-list effect)."""
    elapsed = max(0.0, now - job.created_at)
    fraction = 1.0 if job.duration_s == 0 else elapsed / job.duration_s
    running = min(99, int(100 * fraction))
    if job.behaviour == "never":
        return _View("Job is being processed", "processing", min(running, NEVER_STALL_PROGRESS), "none")
    if fraction >= 1.0:
        if job.behaviour == "fail":
            return _View("Job failed", "failed", running, "none")
        return _View("Job has been completed", "completed", 100, "full")
    if job.behaviour == "unknown_statuses":
        return _unknown_status_view(fraction, running)
    return _View("Job is being processed", "processing", running, "none")


def _unknown_status_view(fraction: float, running: int) -> _View:
    # Check365 documents only "completed"; these stand for the undocumented
    # states a poller must treat as "keep waiting".
    if fraction < 0.25:
        return _View("Job is queued", "queued", 0, "none")
    if fraction < 0.75:
        return _View("Job is being validated", "validating", running, "none")
    return _View("Job is being finalized", "finalizing", 99, "none")


def max_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The largest number of ``times`` inside any half-open interval [t, t + window)."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] + window <= t:
            start += 1
        best = max(best, end - start + 1)
    return best


def _seconds_header(seconds: float) -> str:
    # Whole seconds as HTTP defines them; fractions only when the plan asks for
    # sub-second delays (tests), so the header stays a plain number either way.
    rounded = round(seconds, 3)
    return str(int(rounded)) if rounded == int(rounded) else f"{rounded:g}"


# --------------------------------------------------------------------------- results


_FIRST_NAMES = (
    "james", "mary", "john", "patricia", "robert", "jennifer", "michael", "linda", "david",
    "elizabeth", "william", "barbara", "richard", "susan", "joseph", "jessica", "thomas", "sarah",
    "carlos", "maria", "wei", "yuki", "ahmed", "fatima", "olivia", "liam", "noah", "emma", "lucas",
    "sofia", "priya", "arjun", "chloe", "mateo", "ines", "lars", "anna", "kofi", "amara", "hana",
)  # fmt: skip
_LAST_NAMES = (
    "smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis", "rodriguez",
    "martinez", "hernandez", "lopez", "wilson", "anderson", "taylor", "thomas", "moore", "martin",
    "lee", "thompson", "white", "harris", "clark", "lewis", "walker", "young", "allen", "king",
    "nguyen", "kim", "patel", "singh", "muller", "rossi", "dubois", "novak", "tanaka", "okafor",
)  # fmt: skip
# (domain, provider, accepts every address): company domains host professional mail.
_COMPANY_DOMAINS = (
    ("acme-corp.com", "google_workspace", False),
    ("northwind.io", "microsoft365", False),
    ("globex.net", "microsoft365", False),
    ("initech.com", "google_workspace", False),
    ("umbrella-labs.co", "unknown", True),
    ("stark-industries.com", "microsoft365", False),
    ("hooli.xyz", "google_workspace", False),
    ("vandelay.org", "unknown", True),
    ("wayne-enterprises.com", "microsoft365", True),
    ("piedpiper.dev", "google_workspace", False),
)
_FREE_DOMAINS = (
    ("gmail.com", "gmail"),
    ("googlemail.com", "gmail"),
    ("outlook.com", "outlook"),
    ("hotmail.com", "outlook"),
    ("live.com", "outlook"),
    ("yahoo.com", "yahoo"),
    ("icloud.com", "icloud"),
    ("proton.me", "proton"),
)
# Typos and lapsed domains: they have no mail server, so nothing can be validated.
_DEAD_DOMAINS = ("acme-crop.com", "gmial.com", "hotmial.com", "yaho.com", "northwind-old.io")
_ROLE_NAMES = ("info", "sales", "support", "admin", "contact", "billing", "hr", "office", "noreply", "team")


def _result(
    email: str, *, provider: str, email_type: str, status: str, risk: str, is_role: bool, reason: str
) -> dict[str, object]:
    return {
        "email": email,
        "emailProvider": provider,
        "emailType": email_type,
        "status": status,
        # Only a valid address with low risk is worth a campaign; everything else is held back.
        "safeToSend": status == "valid" and risk == "low",
        "risk": risk,
        "isRole": is_role,
        "statusReason": reason,
    }


def _person_local(rng: random.Random, first: str, last: str, free: bool) -> str:
    pattern = rng.randrange(5)
    if pattern == 0:
        return f"{first}.{last}"
    if pattern == 1:
        return f"{first[0]}{last}"
    if pattern == 2:
        return f"{first}_{last}"
    if pattern == 3 and not free:
        return first
    return f"{first}{last}{rng.randrange(1, 100)}"


def _person(rng: random.Random) -> dict[str, object]:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    free = rng.random() < 0.35
    if free:
        domain, provider = rng.choice(_FREE_DOMAINS)
        catch_all, email_type = False, "personal"
    else:
        domain, provider, catch_all = rng.choice(_COMPANY_DOMAINS)
        email_type = "professional"
    email = f"{_person_local(rng, first, last, free)}@{domain}"
    outcome = rng.random()
    if catch_all:
        status, risk, reason = "catch_all", "medium", "catch_all_domain"
    elif outcome < 0.80:
        status, risk, reason = "valid", "low", "accepted_email"
    elif outcome < 0.92:
        status, risk, reason = "invalid", "high", "mailbox_not_found"
    else:
        status, risk, reason = "unknown", rng.choice(("medium", "high")), "unknown"
    return _result(
        email,
        provider=provider,
        email_type=email_type,
        status=status,
        risk=risk,
        is_role=False,
        reason=reason,
    )


def _role(rng: random.Random) -> dict[str, object]:
    domain, provider, catch_all = rng.choice(_COMPANY_DOMAINS)
    return _result(
        f"{rng.choice(_ROLE_NAMES)}@{domain}",
        provider=provider,
        email_type="professional",
        status="catch_all" if catch_all else "valid",
        risk="medium",
        is_role=True,
        reason="role_account",
    )


def _undeliverable(rng: random.Random) -> dict[str, object]:
    return _result(
        f"{rng.choice(_FIRST_NAMES)}.{rng.choice(_LAST_NAMES)}@{rng.choice(_DEAD_DOMAINS)}",
        provider="unknown",
        email_type="unknown",
        status="unvalidated",
        risk="high",
        is_role=False,
        reason="invalid_domain",
    )


def generate_results(job_id: str, size: int) -> list[dict[str, object]]:
    """The ``size`` results of ``job_id``: realistic, and the same on every call."""
    rng = random.Random(f"check365-sim:{job_id}")  # a str seed is stable across processes
    seen: set[str] = set()
    results: list[dict[str, object]] = []
    for _ in range(size):
        roll = rng.random()
        result = _undeliverable(rng) if roll < 0.04 else _role(rng) if roll < 0.12 else _person(rng)
        if result["isRole"] and result["email"] in seen:
            # Each company has one info@; a large list simply has more people.
            result = _person(rng)
        email = str(result["email"])
        while email in seen:
            # Real lists are deduplicated before upload; a numeric suffix keeps ours unique.
            local, domain = str(result["email"]).split("@")
            email = f"{local}{rng.randrange(100, 100_000)}@{domain}"
        seen.add(email)
        result["email"] = email
        results.append(result)
    return results


class _JobBodies:
    """The completed answers of one job, built once (large jobs take a moment)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.full: bytes | None = None
        self.short: bytes | None = None


def _envelope(job: SimJob, view: _View, results: list[dict[str, object]]) -> dict[str, object]:
    credits = job.size if view.status == "completed" else job.size * view.progress // 100
    return {
        "success": True,
        "message": view.message,
        "data": {
            "jobId": job.job_id,
            "status": view.status,
            "creditsUsed": credits,
            "progress": view.progress,
            "total": job.size,
            "results": results,
        },
    }


# --------------------------------------------------------------------------- the simulator


class Simulator(LocalServer):
    """An in-process Check365 bulk-status API on a loopback port."""

    _thread_name = "check365-simulator"

    def __init__(
        self,
        api_key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        faults: FaultPlan | None = None,
        *,
        latency: Latency = NO_LATENCY,
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self._api_key = api_key
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, SimJob] = {}
        self._bodies: dict[str, _JobBodies] = {}
        self._short_served: dict[str, int] = {}
        self._log: list[SimRequest] = []
        self._blocked_until: dict[str, float] = {}
        self._violations = 0
        self._faults: FaultPlan | None = None
        self._fault_rng = random.Random(0)
        self.set_faults(faults)
        # Every status answer waits this long first (the API across the internet).
        self.latency = latency
        self._latency_rng = random.Random(1)
        self._server = ServerThread(functools.partial(_SimHandler, self), host, port)

    # jobs, faults, observations

    def add_job(self, job_id: str, size: int, duration_s: float, behaviour: str = "normal") -> SimJob:
        """Register (or restart) a job whose clock starts now."""
        job = SimJob(job_id, size, duration_s, behaviour, created_at=self._clock())
        with self._lock:
            self._install(job)
        return job

    def set_api_key(self, api_key: str) -> None:
        """Accept only ``api_key`` from now on: every other key is refused with 401."""
        if not api_key:
            raise ValueError("api_key must not be empty")
        with self._lock:
            self._api_key = api_key

    def set_faults(self, faults: FaultPlan | None) -> None:
        with self._lock:
            self._faults = faults
            self._fault_rng = random.Random(faults.seed if faults else 0)

    def requests(self) -> list[SimRequest]:
        with self._lock:
            return list(self._log)

    def retry_after_violations(self) -> int:
        """Status requests made with an API key before a Retry-After handed to that key had passed."""
        with self._lock:
            return self._violations

    def stats(self) -> dict[str, int]:
        with self._lock:
            times = [r.at for r in self._log]
            violations = self._violations
        return {
            "requests": len(times),
            "retry_after_violations": violations,
            "per_second_max": max_in_window(times, 1.0),
        }

    # answering

    def _install(self, job: SimJob) -> None:
        self._jobs[job.job_id] = job
        self._bodies[job.job_id] = _JobBodies()
        self._short_served.pop(job.job_id, None)

    def _lookup(self, job_id: str, now: float) -> SimJob | None:
        job = self._jobs.get(job_id)
        if job is not None:
            return job
        match = _AUTO_ID.fullmatch(job_id)
        if match is None or int(match[1]) > MAX_AUTO_SIZE:
            return None
        suffix = (match[3] or "").split("-", 1)[0]
        behaviour = suffix if suffix in BEHAVIOURS else "normal"
        job = SimJob(job_id, int(match[1]), float(match[2]), behaviour, created_at=now)
        self._install(job)
        return job

    def _pick_fault(self, plan: FaultPlan | None) -> str | None:
        if plan is None or self._fault_rng.random() >= plan.rate:
            return None
        return self._fault_rng.choice(plan.kinds)

    def _answer_status(self, query: Mapping[str, str]) -> tuple[_Answer, str | None]:
        """The answer to one status request and the fault it met, recorded in the log."""
        now = self._clock()
        api_key = query.get("api_key", "")
        job_id = query.get("job_id", "")
        with self._lock:
            blocked_until = self._blocked_until.get(api_key, -math.inf)
            if now < blocked_until:
                self._violations += 1
                answer = _throttled(blocked_until - now)
                self._log.append(SimRequest(now, job_id, answer.status, "blocked"))
                return answer, "blocked"
            plan = self._faults
            fault = self._pick_fault(plan)
            if plan is not None and fault == "429":
                self._blocked_until[api_key] = now + plan.retry_after_s
        answer, fault = self._answer_with_fault(plan, fault, api_key, job_id, now)
        with self._lock:
            self._log.append(SimRequest(now, job_id, answer.status if answer.status > 0 else 0, fault))
        return answer, fault

    def _answer_with_fault(
        self, plan: FaultPlan | None, fault: str | None, api_key: str, job_id: str, now: float
    ) -> tuple[_Answer, str | None]:
        if plan is None or fault is None:
            return self._answer_normally(api_key, job_id, now, truncate=False)
        if fault == "slow":
            time.sleep(plan.slow_s)
            answer, _ = self._answer_normally(api_key, job_id, now, truncate=False)
            return answer, fault
        if fault == "truncated":
            return self._answer_normally(api_key, job_id, now, truncate=True)
        if fault == "429":
            return _throttled(plan.retry_after_s), fault
        if fault == "malformed":
            with self._lock:
                return _Answer(200, self._fault_rng.choice(_MALFORMED_BODIES)), fault
        return _CANNED_FAULTS[fault], fault

    def _answer_normally(self, api_key: str, job_id: str, now: float, *, truncate: bool) -> tuple[_Answer, str | None]:
        """The documented answer; ``truncate`` asks for a short list if the job is completed."""
        with self._lock:
            accepted = self._api_key
        if api_key != accepted:
            return _Answer(401, orjson.dumps({"success": False, "message": "Invalid API key"})), None
        if not job_id:
            return _Answer(400, orjson.dumps({"success": False, "message": "job_id is required"})), None
        with self._lock:
            job = self._lookup(job_id, now)
            if job is None:
                return _Answer(404, orjson.dumps({"success": False, "message": "Job not found"})), None
            bodies = self._bodies[job_id]
            view = _view_job(job, now)
            short = False
            if view.results == "full" and job.size > 0:
                if truncate:
                    short = True
                elif job.behaviour == "late_results":
                    served = self._short_served.get(job_id, 0)
                    completed_at = job.created_at + job.duration_s
                    if served < LATE_RESULTS_POLLS or now < completed_at + LATE_RESULTS_S:
                        self._short_served[job_id] = served + 1
                        short = True
        if view.results == "none":
            return _Answer(200, orjson.dumps(_envelope(job, view, []))), None
        full, short_body = _completed_bodies(job, view, bodies)
        return _Answer(200, short_body if short else full), "truncated" if truncate and short else None


# Answers that only need the fault's name.
_CANNED_FAULTS = {
    "drop": _Answer(_CLOSE_NOW),
    "5xx": _Answer(503, orjson.dumps({"success": False, "message": "Service temporarily unavailable"})),
    "success_false": _Answer(200, orjson.dumps({"success": False, "message": "Temporary error, try again"})),
}
# What a web server answers for a path it does not serve (nginx's page).
NOT_FOUND_PAGE = (
    b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
    b"<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
# A body cut mid-stream and a proxy's HTML error page: both arrive with HTTP 200.
_MALFORMED_BODIES = (
    b'{"success": true, "message": "Job has been completed", "data": {"jobId": "',
    b"<html><body><h1>502 Bad Gateway</h1></body></html>",
)


def _throttled(retry_after_s: float) -> _Answer:
    body = orjson.dumps({"success": False, "message": "Too many requests"})
    return _Answer(429, body, {"Retry-After": _seconds_header(retry_after_s)})


def _completed_bodies(job: SimJob, view: _View, bodies: _JobBodies) -> tuple[bytes, bytes]:
    with bodies.lock:
        if bodies.full is None or bodies.short is None:
            results = generate_results(job.job_id, job.size)
            bodies.full = orjson.dumps(_envelope(job, view, results))
            # Half the list: short enough that len(results) < total for any size >= 1.
            bodies.short = orjson.dumps(_envelope(job, view, results[: job.size // 2]))
        return bodies.full, bodies.short


class _SimHandler(QuietHandler):
    server_version = "check365-simulator"

    def __init__(self, sim: Simulator, *args: Any) -> None:
        self.sim = sim
        super().__init__(*args)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == STATUS_PATH:
            self.sim.latency.wait(self.sim._latency_rng)
            answer, _ = self.sim._answer_status(dict(parse_qsl(parts.query, keep_blank_values=True)))
            if answer.status == _CLOSE_NOW:
                self.close_connection = True
                return
            self.send_body(answer.status, answer.body, answer.headers)
        elif parts.path == "/_sim/requests":
            self.send_json(200, [asdict(r) for r in self.sim.requests()])
        elif parts.path == "/_sim/stats":
            self.send_json(200, self.sim.stats())
        else:
            self.send_body(404, NOT_FOUND_PAGE, content_type="text/html")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        body = self.read_body(MAX_CONTROL_BODY)
        if body is None:
            return
        if path not in ("/_sim/jobs", "/_sim/faults", "/_sim/key"):
            if path == STATUS_PATH:
                self.send_json(405, {"success": False, "message": "Method not allowed"})
            else:
                self.send_body(404, NOT_FOUND_PAGE, content_type="text/html")
            return
        try:
            payload = orjson.loads(body or b"{}")
            if not isinstance(payload, dict):
                raise TypeError("the body must be a JSON object")
            if path == "/_sim/jobs":
                job = self.sim.add_job(
                    str(payload["job_id"]),
                    int(payload["size"]),
                    float(payload["duration_s"]),
                    str(payload.get("behaviour", "normal")),
                )
                self.send_json(201, asdict(job))
            elif path == "/_sim/key":
                self.sim.set_api_key(str(payload["api_key"]))
                self.send_json(200, {"success": True})
            else:
                self.sim.set_faults(FaultPlan.from_json(payload))
                self.send_json(200, {"success": True})
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self.send_json(400, {"success": False, "message": f"bad request: {exc!s}"})


def serve_forever(
    api_key: str,
    host: str,
    port: int,
    faults: FaultPlan | None,
    *,
    on_ready: Callable[[str], None] | None = None,
    latency: Latency = NO_LATENCY,
) -> None:
    """Serve until interrupted (Ctrl-C); ``on_ready`` receives the base URL once listening."""
    with Simulator(api_key, host=host, port=port, faults=faults, latency=latency) as sim:
        if on_ready is not None:
            on_ready(sim.url)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            return
