"""Nobody let in: callbacks to non-public addresses are refused at enqueue and always at delivery.

- At enqueue, where the address is known (an IP literal): the Python helper raises and the
  CLI exits 2, naming the class of the address; nothing reaches the broker.
- At the worker, for a foreign producer's message with such a literal: ``watch_rejected``
  naming the class, and no watch.
- At delivery, for a host name that resolves to such an address: the event is dead-lettered
  with a reason naming the class, and the target never receives a request. This runs the
  delivery step in this process (the plain functions, against this system's Redis,
  simulator and receiver) with a resolver the test controls: a worker resolves through
  the system's resolver, which no test can point at arbitrary addresses.
- DNS rebinding: the request goes to the address that was checked, and a name that
  answers loopback on the next attempt is refused before anything is sent.
- WEBHOOK_ALLOW_PRIVATE_NETWORKS and WEBHOOK_ALLOW_HTTP lift the rules.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from check365_client.rules import WatchRequest
from tests.reliability.scenario import row_recorder
from tests.support.cluster import Cluster, WorkerProcess, cli_command, wait_until
from tests.support.settings import make_settings
from worker.delivery.step import DeadLettered, Delivered, RetryLater, deliver_once
from worker.errors import InvalidWatchRequest
from worker.intake.enqueue import enqueue_watch
from worker.polling.step import Finished, Reschedule, poll_once, start_watch
from worker.runtime.context import Context, build_context
from worker.settings import Settings

STRICT = {"WEBHOOK_ALLOW_PRIVATE_NETWORKS": "false", "WEBHOOK_ALLOW_HTTP": "false"}
STRICT_QUEUE = "ssrf-strict"
TIMEOUT = 20.0
PUBLIC = "93.184.216.34"  # a global unicast address; no request is ever sent to it (a mock transport answers)

# (address as it appears in a URL host, the words the refusal must contain)
CLASSES = [
    ("127.0.0.1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("100.64.0.1", "CGNAT"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("0.0.0.0", "unspecified"),
    ("[::1]", "loopback"),
    ("[fd00::1]", "unique local"),
    ("[fe80::1]", "link-local"),
    ("[::ffff:127.0.0.1]", "IPv4-mapped loopback"),
    ("[::ffff:169.254.169.254]", "IPv4-mapped link-local"),
    ("[64:ff9b::a01:203]", "NAT64 private"),
    ("[64:ff9b::7f00:1]", "NAT64 loopback"),
]
IDS = [name.replace(" ", "-") + "-" + address.strip("[]") for address, name in CLASSES]


def bare(address: str) -> str:
    """The address as a resolver answers it (no brackets)."""
    return address.strip("[]")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as started:
        started.start_worker("ssrf-strict", concurrency=2, env_overrides=STRICT, queue=STRICT_QUEUE)
        yield started


@pytest.fixture(scope="module")
def strict_worker(cluster: Cluster) -> WorkerProcess:
    return cluster.processes[0]


# --------------------------------------------------------------------------- at enqueue


def test_an_ip_literal_of_every_non_public_class_is_refused_by_the_helper_and_the_cli(cluster: Cluster) -> None:
    settings = cluster.client_settings(**STRICT)
    queue_before = cluster.queue_length()
    for address, name in CLASSES:
        with pytest.raises(InvalidWatchRequest, match=name):
            enqueue_watch("J-ssrf", f"https://{address}/hook", settings=settings)
    # The CLI, one process per class, run side by side.
    env = cluster.env(**STRICT)
    runs = {
        name: subprocess.Popen(
            [*cli_command(), "enqueue", "J-ssrf", f"https://{address}:8443/hook"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for address, name in CLASSES
    }
    for name, run in runs.items():
        out, err = run.communicate(timeout=60)
        assert run.returncode == 2, (name, out, err)
        assert name in err and "callback_url" in err, err
    assert cluster.queue_length() == queue_before, "nothing reached the broker"


# --------------------------------------------------------------------------- at the worker


def test_a_foreign_message_with_a_non_public_literal_is_rejected_by_the_worker(
    cluster: Cluster, strict_worker: WorkerProcess
) -> None:
    sent = {}
    for n, (address, name) in enumerate(CLASSES):
        job = f"ssrf-literal-{n}"
        cluster.sim.add_job(job, size=1, duration_s=0.0)
        url = f"https://{address}:{cluster.receiver.url.rsplit(':', 1)[1]}/hooks/{job}"
        sent[job] = (cluster.send_raw({"job_id": job, "callback_url": url}, queue=STRICT_QUEUE), name)
    for job, (task_id, name) in sent.items():
        record = strict_worker.wait_for_task_record(task_id, "watch_rejected", TIMEOUT)
        assert name in record["reason"] and "not a public address" in record["reason"], record
        assert cluster.watch_state(job) == []
    assert not [r for r in cluster.receiver.received() if r.path.startswith("/hooks/ssrf-literal-")]


# --------------------------------------------------------------------------- at delivery, in process


class RecordingTransport(httpx.BaseTransport):
    """Records every request the webhook client sends, and answers it with ``answer``."""

    def __init__(self, answer: int = 200) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.answer)


@dataclass
class Resolver:
    """Answers each lookup of a name with the next of ``answers`` (the last one repeats)."""

    answers: list[list[str]]
    asked: list[str] = field(default_factory=list)

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return self.answers[min(len(self.asked), len(self.answers)) - 1]


def worker_settings(cluster: Cluster, **overrides: str) -> Settings:
    return make_settings(cluster.env(**{"WEBHOOK_ALLOW_HTTP": "true", **overrides}))


def finish_watch(ctx: Context, cluster: Cluster, job: str, url: str) -> tuple[str, str]:
    """Run a watch of a job that completes at once; return its event's (webhook_id, token)."""
    cluster.sim.add_job(job, size=2, duration_s=0.0)
    step = start_watch(ctx, WatchRequest(job, url, {"scenario": "ssrf"}), "ssrf-in-process")
    deadline = time.monotonic() + TIMEOUT
    while isinstance(step, Reschedule) and time.monotonic() < deadline:
        time.sleep(step.delay)
        step = poll_once(ctx, step.watch_id, step.token)
    assert isinstance(step, Finished) and step.outcome == "completed", step
    (delivery,) = step.deliveries
    return delivery


def hostname_url(cluster: Cluster, job: str) -> str:
    # The receiver's port: were a request to go to loopback, the receiver would get it.
    return f"http://rebind.test:{cluster.receiver.url.rsplit(':', 1)[1]}/hooks/{job}"


@pytest.fixture(scope="module")
def refused(request: pytest.FixtureRequest) -> Iterator[dict[str, tuple[bool, int]]]:
    """What each class's delivery did: (dead-lettered, requests that reached anyone); one row for them all."""
    outcomes: dict[str, tuple[bool, int]] = {}
    yield outcomes
    if outcomes:
        dead = sum(was_dead for was_dead, _ in outcomes.values())
        row_recorder(request.config)(
            f"SSRF: host names resolving to non-public addresses ({len(outcomes)} classes)",
            jobs=len(outcomes),
            events_expected=0,
            delivered=sum(n for _, n in outcomes.values()),
            duplicates=0,
            lost=len(outcomes) - dead,
            recover_s=None,
        )


@pytest.mark.parametrize(("address", "name"), CLASSES, ids=IDS)
def test_a_host_name_resolving_to_a_non_public_address_is_dead_lettered_and_never_contacted(
    cluster: Cluster, refused: dict[str, tuple[bool, int]], address: str, name: str
) -> None:
    settings = worker_settings(cluster, WEBHOOK_ALLOW_PRIVATE_NETWORKS="false")
    job = f"ssrf-resolved-{IDS[CLASSES.index((address, name))]}".replace(":", "-")
    transport = RecordingTransport()
    ctx = build_context(settings, resolver=Resolver([[bare(address)]]), webhook_transport=transport)
    try:
        webhook_id, token = finish_watch(ctx, cluster, job, hostname_url(cluster, job))
        result = deliver_once(ctx, webhook_id, token)
    finally:
        ctx.close()
    event = cluster.outbox().get(webhook_id)
    contacted = len(transport.requests) + len(cluster.receiver.received(f"/hooks/{job}"))
    refused[f"{name} {address}"] = (event is not None and event.state == "dead", contacted)

    assert isinstance(result, DeadLettered), result
    assert name in result.reason and "rebind.test resolves to" in result.reason, result.reason
    assert event is not None and event.state == "dead" and name in str(event.last_error)
    assert webhook_id in cluster.outbox().dead_letters(), "kept, to be replayed once the address is fixed"
    assert contacted == 0, "no request may be sent to a refused address"


def test_dns_rebinding_cannot_redirect_a_delivery_to_loopback(cluster: Cluster) -> None:
    settings = worker_settings(cluster, WEBHOOK_ALLOW_PRIVATE_NETWORKS="false")
    job = "ssrf-rebinding"
    # Public at the first lookup, loopback ever after: the classic rebinding answer.
    resolver = Resolver([[PUBLIC], ["127.0.0.1"]])
    transport = RecordingTransport(answer=503)
    ctx = build_context(settings, resolver=resolver, webhook_transport=transport)
    try:
        webhook_id, token = finish_watch(ctx, cluster, job, hostname_url(cluster, job))
        first = deliver_once(ctx, webhook_id, token)
        assert isinstance(first, RetryLater)
        second = deliver_once(ctx, webhook_id, first.token)
    finally:
        ctx.close()

    # The first attempt went to the address that was checked, under the original name.
    (request,) = transport.requests
    assert request.url.host == PUBLIC
    assert request.headers["host"] == f"rebind.test:{cluster.receiver.url.rsplit(':', 1)[1]}"
    # The second lookup answered loopback: refused before anything was sent.
    assert isinstance(second, DeadLettered) and "loopback" in second.reason
    assert resolver.asked == ["rebind.test", "rebind.test"]
    assert cluster.receiver.received(f"/hooks/{job}") == []


def test_an_answer_mixing_public_and_loopback_addresses_is_refused(cluster: Cluster) -> None:
    settings = worker_settings(cluster, WEBHOOK_ALLOW_PRIVATE_NETWORKS="false")
    job = "ssrf-mixed-answer"
    transport = RecordingTransport()
    ctx = build_context(settings, resolver=Resolver([[PUBLIC, "127.0.0.1"]]), webhook_transport=transport)
    try:
        result = deliver_once(ctx, *finish_watch(ctx, cluster, job, hostname_url(cluster, job)))
    finally:
        ctx.close()
    assert isinstance(result, DeadLettered) and "loopback" in result.reason
    assert transport.requests == []


# --------------------------------------------------------------------------- the settings that lift the rules


def test_allow_private_networks_lifts_the_address_rules_at_enqueue_and_delivery(cluster: Cluster) -> None:
    lenient = parked(cluster, WEBHOOK_ALLOW_PRIVATE_NETWORKS="true", WEBHOOK_ALLOW_HTTP="false")
    for address, _ in CLASSES:
        assert enqueue_watch("J-allowed", f"https://{address}/hook", settings=lenient)
    settings = worker_settings(cluster, WEBHOOK_ALLOW_PRIVATE_NETWORKS="true")
    job = "ssrf-allowed"
    ctx = build_context(settings, resolver=Resolver([["127.0.0.1"]]))  # the real transport: to the receiver
    try:
        result = deliver_once(ctx, *finish_watch(ctx, cluster, job, hostname_url(cluster, job)))
    finally:
        ctx.close()
    assert isinstance(result, Delivered)
    (request,) = wait_until(lambda: cluster.receiver.received(f"/hooks/{job}"), TIMEOUT, "the delivery")
    assert request.verified and request.headers["host"].startswith("rebind.test:")


def test_allow_http_decides_whether_plain_http_callbacks_are_accepted(cluster: Cluster) -> None:
    url = "http://hooks.example.com/check365"
    with pytest.raises(InvalidWatchRequest, match="https"):
        enqueue_watch("J-http", url, settings=parked(cluster, WEBHOOK_ALLOW_HTTP="false"))
    refused = cluster.cli("enqueue", "J-http", url, env_overrides={"WEBHOOK_ALLOW_HTTP": "false"})
    assert refused.returncode == 2 and "https" in refused.stderr
    assert enqueue_watch("J-http", url, settings=parked(cluster, WEBHOOK_ALLOW_HTTP="true"))


PARKED_QUEUE = "ssrf-parked"


def parked(cluster: Cluster, **overrides: str) -> Settings:
    """Settings whose messages go to a queue no worker consumes: a test reads only the client's verdict."""
    return cluster.client_settings(CHECK365_QUEUE=PARKED_QUEUE, **overrides)


@pytest.fixture(autouse=True)
def _no_parked_messages_left(cluster: Cluster) -> Iterator[None]:
    yield
    cluster.redis().delete(PARKED_QUEUE)
