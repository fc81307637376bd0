"""Endpoints (contract section 5) with real parts: two receivers each verifying with its own
secret through ``standardwebhooks``, a rotation done by restarting the worker, the allow-list,
and private receivers let in per endpoint while the pool's flags stay off; then the receivers'
tools: ``endpoints`` (fingerprints, never secrets), ``send-test`` and ``endpoints recover``.

Both receivers listen on 127.0.0.1 over plain http: only their endpoints' ``allow_http`` and
``allow_private_networks`` let them in, since these workers run with WEBHOOK_ALLOW_HTTP and
WEBHOOK_ALLOW_PRIVATE_NETWORKS false and WEBHOOK_ENDPOINTS_ONLY true.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from check365_client import UnregisteredEndpoint
from tests.support.cluster import Cluster, new_secret, quiet_period, wait_until
from tests.support.schemas import assert_events_valid
from worker.delivery.signing import fingerprint
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
            # billing's 3 s retry waits as a countdown message (no beat runs here): this bounds those.
            "POLL_MAX_DELAY_S": "10",
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
    before = cluster.start_worker(
        "it-rotation-before", concurrency=1, env_overrides=endpoints.env(), queue=ROTATION_QUEUE
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
        "it-rotation-after", concurrency=1, env_overrides=endpoints.env(rotated), queue=ROTATION_QUEUE
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


def test_endpoints_lists_each_endpoint_with_its_secrets_fingerprints_never_the_secrets(endpoints: Endpoints) -> None:
    cluster = endpoints.cluster
    listed = cluster.cli("endpoints", "--json", env_overrides=endpoints.env())
    assert listed.returncode == 0, listed.stderr
    # Each named endpoint under its scheme, host and port, beside that key's isolation state.
    keys = {row["endpoint"]: row for row in json.loads(listed.stdout)}
    billing_key, crm_key = endpoints.billing.url, endpoints.crm.url  # http://127.0.0.1:PORT
    [billing] = keys[billing_key]["named"]
    [crm] = keys[crm_key]["named"]
    assert keys[crm_key]["breaker"] == "closed" and keys[crm_key]["max_in_flight"] >= 1
    assert (billing["name"], billing["secret_fingerprints"]) == ("billing", [fingerprint(BILLING_SECRET)])
    assert billing["secret_source"] == "env IT_BILLING_SECRET" and billing["retry_delays_s"] == [3.0]
    assert (crm["name"], crm["secret_fingerprints"]) == ("crm", [fingerprint(CRM_SECRET)])
    assert crm["allow_private_networks"] is True
    text = cluster.cli("endpoints", env_overrides=endpoints.env())
    assert text.returncode == 0 and fingerprint(CRM_SECRET) in text.stdout, text.stderr
    assert "other URLs: refused (WEBHOOK_ENDPOINTS_ONLY)" in text.stdout
    for output in (listed.stdout, text.stdout):
        for secret in (BILLING_SECRET, CRM_SECRET, cluster.secret):
            assert secret.removeprefix("whsec_") not in output


@pytest.mark.parametrize("kind", ["completed", "failed", "timed_out"])
def test_send_test_sends_a_signed_sample_event_marked_as_a_test_without_a_job(endpoints: Endpoints, kind: str) -> None:
    cluster = endpoints.cluster
    before = len(endpoints.crm.received("/check365"))
    sent = cluster.cli("send-test", "--endpoint", "crm", "--type", kind, "--json", env_overrides=endpoints.env())
    assert sent.returncode == 0, sent.stdout + sent.stderr
    result = json.loads(sent.stdout)
    assert result["ok"] and result["endpoint"] == "crm" and result["signed_with"] == [fingerprint(CRM_SECRET)]
    received = endpoints.crm.received("/check365")
    assert len(received) == before + 1
    test_event = received[-1]
    assert test_event.verified and test_event.headers["webhook-id"] == result["webhook_id"]
    assert not verifies(cluster.secret, test_event)
    body = test_event.json()
    assert body["type"] == f"bulk_validation.{kind}" and body["data"]["test"] is True
    assert_events_valid([test_event])
    # No job: nothing was watched, nothing is stored.
    assert not cluster.watch_state(body["data"]["jobId"])
    assert cluster.outbox().get(result["webhook_id"]) is None


def test_send_test_to_a_url_of_no_endpoint_is_refused_by_the_allow_list(endpoints: Endpoints) -> None:
    cluster = endpoints.cluster
    refused = cluster.cli(
        "send-test", "--url", cluster.callback_url("/hooks/E-send-test"), env_overrides=endpoints.env()
    )
    assert refused.returncode == 2 and "matches no endpoint" in refused.stderr, refused.stderr
    unknown = cluster.cli("send-test", "--endpoint", "nope", env_overrides=endpoints.env())
    assert unknown.returncode == 2 and "billing, crm" in unknown.stderr, unknown.stderr
    assert not cluster.receiver.received("/hooks/E-send-test")


def test_recover_replays_one_endpoints_dead_letters_since_a_time_with_their_webhook_ids(
    endpoints: Endpoints,
) -> None:
    cluster = endpoints.cluster
    # billing retries once after 3 s: both jobs' events are dead after two refused attempts.
    endpoints.billing.default("/hooks/E-recover", 500)
    endpoints.crm.default("/check365/E-recover-crm", 500)
    endpoints.enqueue("E-recover", endpoints.billing.url + "/hooks/E-recover")
    endpoints.enqueue("E-recover-crm", endpoints.crm.url + "/check365/E-recover-crm")
    outbox = cluster.outbox()

    def dead(job: str) -> str | None:
        watches = cluster.watch_state(job)
        events = [outbox.get(i) for w in watches for i in w.events]
        return events[0].webhook_id if events and events[0] is not None and events[0].state == "dead" else None

    billing_id = wait_until(lambda: dead("E-recover"), TIMEOUT * 2, "billing's event is dead-lettered")
    crm_id = wait_until(lambda: dead("E-recover-crm"), TIMEOUT * 2, "crm's event is dead-lettered")

    later = cluster.cli(
        "endpoints", "recover", "billing", "--since", "2099-01-01T00:00:00Z", "--json", env_overrides=endpoints.env()
    )
    assert later.returncode == 0 and json.loads(later.stdout)["replayed"] == [], later.stdout + later.stderr

    endpoints.billing.default("/hooks/E-recover", 200)
    recovered = cluster.cli(
        "endpoints", "recover", "billing", "--since", "10m", "--json", env_overrides=endpoints.env()
    )
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert json.loads(recovered.stdout)["replayed"] == [billing_id]
    endpoints.billing.wait_for(
        lambda rx: any(r.path == "/hooks/E-recover" and r.status_sent == 200 for r in rx), TIMEOUT
    )
    delivered = [r for r in endpoints.billing.received("/hooks/E-recover") if r.status_sent == 200]
    assert [r.headers["webhook-id"] for r in delivered] == [billing_id] and delivered[0].verified
    # crm's dead letter stays where it was.
    assert (event := outbox.get(crm_id)) is not None and event.state == "dead"


def test_doctor_names_a_bad_endpoints_files_endpoint_and_key_and_lists_a_good_one(endpoints: Endpoints) -> None:
    cluster = endpoints.cluster
    good = cluster.cli("doctor", "--json", env_overrides=endpoints.env())
    checks = {c["name"]: c for c in json.loads(good.stdout)["checks"]}
    assert checks["endpoints"]["status"] == "ok", checks
    assert "billing (1 secret(s)), crm (1 secret(s))" in checks["endpoints"]["detail"]
    bad = cluster.cli("doctor", "--json", env_overrides=endpoints.env(IT_BILLING_SECRET="whsec_notbase64!"))
    assert bad.returncode == 1
    [settings] = [c for c in json.loads(bad.stdout)["checks"] if c["name"] == "settings"]
    assert settings["status"] == "fail"
    assert "WEBHOOK_ENDPOINTS_FILE endpoint 'billing', key 'secret_env'" in settings["detail"]
    assert "notbase64" not in bad.stdout
