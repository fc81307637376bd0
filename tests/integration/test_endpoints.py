"""Endpoints (contract section 5) with real parts: two receivers each verifying with its own
secret through ``standardwebhooks``, a rotation done by restarting the worker, the allow-list,
and private receivers let in per endpoint while the pool's flags stay off.

Both receivers listen on 127.0.0.1 over plain http: only their endpoints' ``allow_http`` and
``allow_private_networks`` let them in, since these workers run with WEBHOOK_ALLOW_HTTP and
WEBHOOK_ALLOW_PRIVATE_NETWORKS false and WEBHOOK_ENDPOINTS_ONLY true.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from check365_client import UnregisteredEndpoint
from tests.support.cluster import Cluster, new_secret, quiet_period, wait_until
from worker.intake.enqueue import enqueue_watch
from worker.local.receiver import Received, Receiver

pytestmark = pytest.mark.integration

TIMEOUT = 25.0
QUEUE = "it-endpoints"
ROTATION_QUEUE = "it-endpoints-rotation"
BILLING_SECRET = new_secret()
CRM_SECRET = new_secret()


def verifies(secret: str, request: Received) -> bool:
    try:
        Webhook(secret).verify(request.body, request.headers)
    except Exception:  # standardwebhooks raises its own error, or a ValueError on a bad header
        return False
    return True


class Endpoints:
    def __init__(self, cluster: Cluster, billing: Receiver, crm: Receiver, directory: Path) -> None:
        self.cluster, self.billing, self.crm = cluster, billing, crm
        self.file = directory / "endpoints.toml"
        # billing's secret comes from the environment (rotated by restarting with a new value);
        # crm's is written in the file. billing retries once, after 3 s (a rotation fits in it).
        self.file.write_text(
            f"""
[endpoints.billing]
url = "{billing.url}/hooks"
secret_env = "IT_BILLING_SECRET"
allow_http = true
allow_private_networks = true
retry_delays_s = [3]

[endpoints.crm]
url = "{crm.url}/check365"
secret = "{CRM_SECRET}"
allow_http = true
allow_private_networks = true
""",
            encoding="utf-8",
        )

    def env(self, billing_secret: str = BILLING_SECRET, **overrides: str) -> dict[str, str]:
        return {
            "WEBHOOK_ALLOW_HTTP": "false",
            "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "false",
            "WEBHOOK_ENDPOINTS_FILE": str(self.file),
            "WEBHOOK_ENDPOINTS_ONLY": "true",
            "IT_BILLING_SECRET": billing_secret,
            "CHECK365_QUEUE": QUEUE,
            **overrides,
        }

    def enqueue(self, job_id: str, url: str, queue: str = QUEUE) -> str:
        self.cluster.sim.add_job(job_id, size=2, duration_s=0.0)
        return enqueue_watch(job_id, url, settings=self.cluster.client_settings(**self.env(CHECK365_QUEUE=queue)))


@pytest.fixture(scope="module")
def endpoints(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    with Receiver(BILLING_SECRET) as billing, Receiver(CRM_SECRET) as crm:
        setup = Endpoints(cluster, billing, crm, tmp_path_factory.mktemp("endpoints"))
        worker = cluster.start_worker("it-endpoints", concurrency=2, env_overrides=setup.env(), queue=QUEUE)
        try:
            yield setup
        finally:
            worker.stop()
            cluster.processes.remove(worker)


def test_each_receiver_verifies_with_its_own_secret_and_no_other_secret_verifies_its_events(
    endpoints: Endpoints,
) -> None:
    billing_url = endpoints.billing.url + "/hooks/E-billing"
    crm_url = endpoints.crm.url + "/check365/E-crm"
    endpoints.enqueue("E-billing", billing_url)
    endpoints.enqueue("E-crm", crm_url)
    endpoints.billing.wait_for(lambda rx: any(r.path == "/hooks/E-billing" for r in rx), TIMEOUT)
    endpoints.crm.wait_for(lambda rx: any(r.path == "/check365/E-crm" for r in rx), TIMEOUT)
    (to_billing,) = endpoints.billing.received("/hooks/E-billing")
    (to_crm,) = endpoints.crm.received("/check365/E-crm")
    # Each receiver's own standardwebhooks verifier, holding only its secret, accepted its event.
    assert to_billing.verified and to_crm.verified, (to_billing.error, to_crm.error)
    assert to_billing.json()["data"]["jobId"] == "E-billing" and to_crm.json()["data"]["jobId"] == "E-crm"
    # One signature each: the endpoint's one secret, not WEBHOOK_SECRET besides.
    assert len(to_billing.headers["webhook-signature"].split()) == 1
    assert len(to_crm.headers["webhook-signature"].split()) == 1
    # Neither the other receiver's secret nor WEBHOOK_SECRET verifies them: no receiver can forge for another.
    for secret in (CRM_SECRET, endpoints.cluster.secret):
        assert not verifies(secret, to_billing)
    for secret in (BILLING_SECRET, endpoints.cluster.secret):
        assert not verifies(secret, to_crm)


def test_an_unregistered_callback_url_is_refused_by_the_client_and_by_the_worker_before_any_request(
    endpoints: Endpoints,
) -> None:
    cluster = endpoints.cluster
    unregistered = cluster.callback_url("/hooks/E-unregistered")  # a live receiver, in no endpoint
    # A private address on a registered host, outside the endpoint's path: no endpoint either.
    beside = endpoints.crm.url + "/check365-admin/E-unregistered"
    for url in (unregistered, beside):
        with pytest.raises(UnregisteredEndpoint):
            endpoints.enqueue("E-unregistered", url)
    cli = cluster.cli("enqueue", "E-unregistered", unregistered, env_overrides=endpoints.env())
    assert cli.returncode == 2 and "matches no endpoint" in cli.stderr, cli.stderr

    # A foreign producer skips the client: the worker refuses the message itself.
    cluster.sim.add_job("E-unregistered", size=2, duration_s=0.0)
    task_id = cluster.send_raw({"job_id": "E-unregistered", "callback_url": unregistered}, queue=QUEUE)
    worker = next(p for p in cluster.processes if p.name == "it-endpoints")
    record = worker.wait_for_task_record(task_id, "watch_rejected", TIMEOUT)
    assert record["reason"] == "unregistered_endpoint"
    quiet_period(1.0)
    assert not [r for r in cluster.sim.requests() if r.job_id == "E-unregistered"], "Check365 was asked"
    assert not cluster.receiver.received("/hooks/E-unregistered")
    assert not cluster.watch_state("E-unregistered")


def test_a_rotation_by_restarting_the_worker_signs_the_pending_retry_with_the_new_secret(
    endpoints: Endpoints,
) -> None:
    cluster = endpoints.cluster
    rotated = new_secret()
    path = "/hooks/E-rotation"
    endpoints.billing.script(path, [500])
    # The retry waits as a countdown message (no beat runs here): POLL_MAX_DELAY_S bounds those.
    countdown = {"POLL_MAX_DELAY_S": "10"}
    before = cluster.start_worker(
        "it-rotation-before", concurrency=1, env_overrides=endpoints.env(**countdown), queue=ROTATION_QUEUE
    )
    endpoints.enqueue("E-rotation", endpoints.billing.url + path, queue=ROTATION_QUEUE)
    endpoints.billing.wait_for(lambda rx: any(r.path == path for r in rx), TIMEOUT)
    (first,) = endpoints.billing.received(path)
    outbox = cluster.outbox()
    wait_until(
        lambda: (e := outbox.get(first.headers["webhook-id"])) is not None and e.tries == 1,
        TIMEOUT,
        "the failed first attempt is recorded",
    )
    # The first attempt failed; its retry waits 3 s. The operator rotates: new secret, restart.
    assert before.stop(signal.SIGTERM) == 0
    after = cluster.start_worker(
        "it-rotation-after", concurrency=1, env_overrides=endpoints.env(rotated, **countdown), queue=ROTATION_QUEUE
    )
    endpoints.billing.wait_for(lambda rx: sum(r.path == path for r in rx) >= 2, TIMEOUT)
    first, retry = endpoints.billing.received(path)
    assert first.headers["webhook-id"] == retry.headers["webhook-id"]
    assert verifies(BILLING_SECRET, first) and not verifies(rotated, first)
    assert verifies(rotated, retry) and not verifies(BILLING_SECRET, retry)
    assert retry.status_sent == 200
    wait_until(
        lambda: (e := cluster.outbox().get(retry.headers["webhook-id"])) is not None and e.state == "delivered",
        TIMEOUT,
        "the retried event is recorded as delivered",
    )
    after.stop()
