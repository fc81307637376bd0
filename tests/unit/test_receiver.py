"""The webhook receiver verifies with the reference package, records everything and answers as scripted.

Each signature test builds one message signed by ``standardwebhooks`` itself and breaks one thing.
"""

from __future__ import annotations

import base64
import os
import ssl
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from standardwebhooks import Webhook

from worker.local.receiver import Received, Receiver

TLS = ssl.create_default_context()  # shared: loading CA certificates dominates a new client's cost


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


SECRET = new_secret()
BODY = b'{"type":"bulk_validation.completed","data":{"jobId":"J-42","results":[]}}'


def signed_headers(
    body: bytes, secret: str = SECRET, msg_id: str = "msg_1", at: datetime | None = None
) -> dict[str, str]:
    timestamp = at or datetime.now(tz=UTC)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, timestamp, body.decode()),
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(SECRET) as rx:
        yield rx


@pytest.fixture
def client(receiver: Receiver) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=receiver.url, timeout=10, verify=TLS) as c:
        yield c


# --------------------------------------------------------------------------- verification


def test_a_correctly_signed_post_is_verified_and_recorded(receiver: Receiver, client: httpx.Client) -> None:
    response = client.post("/hook?x=1", content=BODY, headers=signed_headers(BODY))
    assert response.status_code == 200
    [got] = receiver.received()
    assert got.verified is True
    assert got.error is None
    assert got.path == "/hook"
    assert got.body == BODY
    assert got.status_sent == 200
    assert got.headers["webhook-id"] == "msg_1"
    assert all(name == name.lower() for name in got.headers)
    assert got.json()["data"]["jobId"] == "J-42"


def test_a_tampered_body_is_recorded_but_not_verified(receiver: Receiver, client: httpx.Client) -> None:
    headers = signed_headers(BODY)
    tampered = BODY.replace(b"J-42", b"J-43")
    assert client.post("/hook", content=tampered, headers=headers).status_code == 200
    [got] = receiver.received()
    assert got.verified is False
    assert got.error is not None
    assert "signature" in got.error.lower()
    assert got.body == tampered


def test_a_body_signed_with_another_secret_is_not_verified(receiver: Receiver, client: httpx.Client) -> None:
    client.post("/hook", content=BODY, headers=signed_headers(BODY, secret=new_secret()))
    assert receiver.received()[0].verified is False


def test_a_stale_timestamp_is_not_verified(receiver: Receiver, client: httpx.Client) -> None:
    stale = datetime.now(tz=UTC) - timedelta(minutes=10)
    client.post("/hook", content=BODY, headers=signed_headers(BODY, at=stale))
    [got] = receiver.received()
    assert got.verified is False
    assert got.error is not None
    assert "old" in got.error


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_not_verified(receiver: Receiver, client: httpx.Client, missing: str) -> None:
    headers = signed_headers(BODY)
    del headers[missing]
    client.post("/hook", content=BODY, headers=headers)
    assert receiver.received()[0].verified is False


def test_a_garbled_signature_header_is_not_verified(receiver: Receiver, client: httpx.Client) -> None:
    headers = signed_headers(BODY) | {"webhook-signature": "v1"}
    assert client.post("/hook", content=BODY, headers=headers).status_code == 200
    assert receiver.received()[0].verified is False


def test_any_of_several_secrets_verifies_as_while_rotating_keys() -> None:
    old, new = new_secret(), new_secret()
    with Receiver([old, new]) as rx, httpx.Client(base_url=rx.url, verify=TLS) as c:
        c.post("/a", content=BODY, headers=signed_headers(BODY, secret=new))
        c.post("/a", content=BODY, headers=signed_headers(BODY, secret=old))
        c.post("/a", content=BODY, headers=signed_headers(BODY, secret=new_secret()))
        assert [r.verified for r in rx.received()] == [True, True, False]


def test_a_signed_body_that_is_not_json_is_still_verified(receiver: Receiver, client: httpx.Client) -> None:
    body = b"not json at all"
    client.post("/hook", content=body, headers=signed_headers(body))
    assert receiver.received()[0].verified is True


def test_a_chunked_body_is_read_whole(receiver: Receiver, client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield BODY[:10]
        yield BODY[10:]

    client.post("/hook", content=chunks(), headers=signed_headers(BODY))
    [got] = receiver.received()
    assert got.body == BODY
    assert got.verified is True


# --------------------------------------------------------------------------- scripted answers


def test_scripted_answers_come_in_order_then_200(receiver: Receiver, client: httpx.Client) -> None:
    receiver.script("/hook", [503, 500, 201])
    receiver.script("/hook", [202])  # appended after the first script
    statuses = [client.post("/hook", content=BODY).status_code for _ in range(6)]
    assert statuses == [503, 500, 201, 202, 200, 200]
    assert [r.status_sent for r in receiver.received("/hook")] == statuses


def test_a_default_answer_holds_once_the_script_runs_out(receiver: Receiver, client: httpx.Client) -> None:
    receiver.script("/gone", [503])
    receiver.default("/gone", 410)
    assert [client.post("/gone", content=BODY).status_code for _ in range(4)] == [503, 410, 410, 410]
    # Other paths keep their own answers.
    assert client.post("/other", content=BODY).status_code == 200


def test_scripted_headers_are_sent(receiver: Receiver, client: httpx.Client) -> None:
    elsewhere = receiver.url + "/other"
    receiver.script("/hook", [(302, {"Location": elsewhere}), (429, {"Retry-After": "1"}), 204])
    redirect = client.post("/hook", content=BODY)
    assert (redirect.status_code, redirect.headers["location"]) == (302, elsewhere)
    throttled = client.post("/hook", content=BODY)
    assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "1")
    no_content = client.post("/hook", content=BODY)
    assert (no_content.status_code, no_content.content) == (204, b"")
    # The connection is still usable after a body-less answer.
    assert client.post("/hook", content=BODY).status_code == 200
    assert receiver.received("/other") == []


def test_a_bad_status_cannot_be_scripted(receiver: Receiver) -> None:
    with pytest.raises(ValueError, match="status"):
        receiver.script("/hook", [42])


def test_received_filters_by_path(receiver: Receiver, client: httpx.Client) -> None:
    for path in ("/a", "/b", "/a"):
        client.post(path, content=BODY)
    assert [r.path for r in receiver.received("/a")] == ["/a", "/a"]
    assert [r.path for r in receiver.received()] == ["/a", "/b", "/a"]


# --------------------------------------------------------------------------- waiting and callbacks


def test_wait_for_returns_once_the_predicate_holds(receiver: Receiver) -> None:
    def post_later() -> None:
        with httpx.Client(base_url=receiver.url, verify=TLS) as c:
            for n in range(3):
                c.post("/hook", content=BODY, headers=signed_headers(BODY, msg_id=f"msg_{n}"))

    sender = threading.Thread(target=post_later)
    sender.start()
    got = receiver.wait_for(lambda rs: len(rs) >= 3, timeout=10)
    sender.join()
    assert [r.headers["webhook-id"] for r in got[:3]] == ["msg_0", "msg_1", "msg_2"]


def test_wait_for_times_out_with_what_it_saw(receiver: Receiver, client: httpx.Client) -> None:
    client.post("/hook", content=BODY, headers=signed_headers(BODY, msg_id="msg_seen"))
    with pytest.raises(TimeoutError, match=r"1 POST\(s\) received.*msg_seen"):
        receiver.wait_for(lambda rs: len(rs) >= 2, timeout=0.01)


def test_on_receive_sees_each_post_and_cannot_break_delivery() -> None:
    seen: list[Received] = []

    def callback(item: Received) -> None:
        seen.append(item)
        raise RuntimeError("a broken printer")

    with Receiver(SECRET, on_receive=callback) as rx, httpx.Client(base_url=rx.url, verify=TLS) as c:
        assert c.post("/hook", content=BODY, headers=signed_headers(BODY)).status_code == 200
        assert c.post("/hook", content=BODY).status_code == 200
    assert [r.verified for r in seen] == [True, False]


# --------------------------------------------------------------------------- control surface and setup


def test_control_surface_scripts_and_reports(receiver: Receiver, client: httpx.Client) -> None:
    script = {"path": "/hook", "responses": [[503, {}], [429, {"Retry-After": "2"}], 500], "default": 410}
    assert client.post("/_rx/script", json=script).status_code == 200
    statuses = [client.post("/hook", content=BODY, headers=signed_headers(BODY)).status_code for _ in range(5)]
    assert statuses == [503, 429, 500, 410, 410]

    listed = client.get("/_rx/received", params={"path": "/hook"}).json()
    assert [r["status_sent"] for r in listed] == statuses
    assert listed[0]["body"] == BODY.decode()
    assert listed[0]["verified"] is True
    assert listed[0]["headers"]["webhook-id"] == "msg_1"
    assert client.get("/_rx/received", params={"path": "/nowhere"}).json() == []
    # Control requests are not webhooks.
    assert len(receiver.received()) == 5


@pytest.mark.parametrize("script", [{"responses": [200]}, {"path": "/h", "responses": [[99, {}]]}, [1]])
def test_control_surface_refuses_bad_scripts(client: httpx.Client, script: object) -> None:
    assert client.post("/_rx/script", json=script).status_code == 400


def test_without_standardwebhooks_construction_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "standardwebhooks", None)
    with pytest.raises(ImportError, match="standardwebhooks"):
        Receiver(SECRET)


def test_at_least_one_secret_is_needed() -> None:
    with pytest.raises(ValueError, match="secret"):
        Receiver([])
