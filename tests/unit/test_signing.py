"""Signing is checked against the independent reference library, standardwebhooks."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from worker.delivery.signing import decode_secret, new_webhook_id, sign, verify, webhook_headers
from worker.errors import InvalidSignature, PermanentError

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
KEY_C = bytes(range(200, 232))
SECRET_A = "whsec_" + base64.b64encode(KEY_A).decode()
SECRET_B = "whsec_" + base64.b64encode(KEY_B).decode()
SECRET_C = "whsec_" + base64.b64encode(KEY_C).decode()
MSG_ID = "msg_2kwr6bzxtfkzm4xq2yfvl3ns7hatwqme"
USER_AGENT = "check365-worker/0.1.0"
BODY = json.dumps(
    {"type": "bulk_validation.completed", "data": {"jobId": "J-42", "note": "café ✓"}},
    ensure_ascii=False,
).encode()

Headers = dict[str, str]


def fresh_message(secrets: list[str]) -> tuple[Headers, bytes, int]:
    # standardwebhooks checks against its own clock with 5 minutes of tolerance.
    ts = int(time.time())
    return webhook_headers(secrets, MSG_ID, ts, BODY, USER_AGENT), BODY, ts


def test_decode_secret_returns_the_key() -> None:
    assert decode_secret(SECRET_A) == KEY_A


@pytest.mark.parametrize(
    "secret",
    ["", "whsec_", "abc" + SECRET_A[6:], "whsec_!!not-base64!!", "whsec_" + SECRET_A[6:-2] + "*x"],
)
def test_decode_secret_refuses_malformed_secrets_without_echoing_them(secret: str) -> None:
    with pytest.raises(ValueError, match="secret") as info:
        decode_secret(secret)
    body = secret.removeprefix("whsec_")
    if body:
        assert body not in str(info.value)


def test_headers_carry_the_contract_fields() -> None:
    headers, _, ts = fresh_message([SECRET_A])
    assert headers == {
        "content-type": "application/json",
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign([SECRET_A], MSG_ID, ts, BODY),
        "user-agent": USER_AGENT,
    }
    assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=", headers["webhook-signature"])


def test_signature_equals_the_reference_signature() -> None:
    ts = int(time.time())
    expected = Webhook(SECRET_A).sign(MSG_ID, datetime.fromtimestamp(ts, tz=UTC), BODY.decode())
    assert sign([SECRET_A], MSG_ID, ts, BODY) == expected


def test_reference_library_verifies_a_single_secret_signature() -> None:
    headers, body, _ = fresh_message([SECRET_A])
    assert Webhook(SECRET_A).verify(body, headers) == json.loads(body)


@pytest.mark.parametrize("secret", [SECRET_A, SECRET_B, SECRET_C])
def test_each_secret_alone_verifies_a_multi_signature_header(secret: str) -> None:
    headers, body, ts = fresh_message([SECRET_A, SECRET_B, SECRET_C])
    assert len(headers["webhook-signature"].split(" ")) == 3
    Webhook(secret).verify(body, headers)
    verify([secret], headers, body, now=ts)


def test_verify_accepts_any_of_several_secrets() -> None:
    headers, body, ts = fresh_message([SECRET_B])
    verify([SECRET_A, SECRET_B], headers, body, now=ts)


def test_verify_accepts_what_the_reference_library_signs() -> None:
    ts = int(time.time())
    signature = Webhook(SECRET_A).sign(MSG_ID, datetime.fromtimestamp(ts, tz=UTC), BODY.decode())
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": str(ts), "webhook-signature": signature}
    verify([SECRET_A], headers, BODY, now=time.time())


def test_verify_looks_headers_up_case_insensitively() -> None:
    headers, body, ts = fresh_message([SECRET_A])
    verify([SECRET_A], {k.upper(): v for k, v in headers.items()}, body, now=ts)


def test_the_bytes_on_the_wire_are_the_signed_bytes() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    headers, body, ts = fresh_message([SECRET_A, SECRET_B])
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        client.post("https://hooks.example.com/check365", content=body, headers=headers)

    (request,) = seen
    assert request.content == body
    verify([SECRET_B], request.headers, request.content, now=ts)
    Webhook(SECRET_A).verify(request.content, dict(request.headers))


# One valid message, then exactly one thing broken: both libraries must refuse it.
Mutation = Callable[[Headers, bytes, int], tuple[Headers, bytes, str]]


def flip_body_byte(h: Headers, b: bytes, ts: int) -> tuple[Headers, bytes, str]:
    return h, b[:10] + bytes([b[10] ^ 0x01]) + b[11:], SECRET_A


def change_id(h: Headers, b: bytes, ts: int) -> tuple[Headers, bytes, str]:
    return {**h, "webhook-id": MSG_ID + "x"}, b, SECRET_A


def change_timestamp(h: Headers, b: bytes, ts: int) -> tuple[Headers, bytes, str]:
    return {**h, "webhook-timestamp": str(ts - 1)}, b, SECRET_A


def stale_timestamp(h: Headers, b: bytes, ts: int) -> tuple[Headers, bytes, str]:
    # Correctly signed, but ten minutes old: a replay.
    return webhook_headers([SECRET_A], MSG_ID, ts - 600, b, USER_AGENT), b, SECRET_A


def future_timestamp(h: Headers, b: bytes, ts: int) -> tuple[Headers, bytes, str]:
    return webhook_headers([SECRET_A], MSG_ID, ts + 600, b, USER_AGENT), b, SECRET_A


def wrong_secret(h: Headers, b: bytes, ts: int) -> tuple[Headers, bytes, str]:
    return h, b, SECRET_C


def without(name: str) -> Mutation:
    def drop(h: Headers, b: bytes, ts: int) -> tuple[Headers, bytes, str]:
        return {k: v for k, v in h.items() if k != name}, b, SECRET_A

    return drop


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (flip_body_byte, "no v1 signature matches"),
        (change_id, "no v1 signature matches"),
        (change_timestamp, "no v1 signature matches"),
        (stale_timestamp, "too old"),
        (future_timestamp, "too new"),
        (wrong_secret, "no v1 signature matches"),
        (without("webhook-id"), "missing header webhook-id"),
        (without("webhook-timestamp"), "missing header webhook-timestamp"),
        (without("webhook-signature"), "missing header webhook-signature"),
    ],
)
def test_one_broken_thing_is_refused_by_both_libraries(mutate: Mutation, reason: str) -> None:
    headers, body, ts = fresh_message([SECRET_A])
    Webhook(SECRET_A).verify(body, headers)
    verify([SECRET_A], headers, body, now=ts)

    bad_headers, bad_body, secret = mutate(headers, body, ts)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(bad_body, bad_headers)
    with pytest.raises(InvalidSignature, match=reason) as info:
        verify([secret], bad_headers, bad_body, now=ts)
    assert isinstance(info.value, PermanentError)
    assert info.value.reason == "invalid_signature"


def test_tolerance_bounds_are_inclusive() -> None:
    ts = 1_800_000_000
    headers = webhook_headers([SECRET_A], MSG_ID, ts, BODY, USER_AGENT)
    verify([SECRET_A], headers, BODY, now=ts + 300)
    verify([SECRET_A], headers, BODY, now=ts - 300)
    with pytest.raises(InvalidSignature, match="too old"):
        verify([SECRET_A], headers, BODY, now=ts + 301)
    with pytest.raises(InvalidSignature, match="too new"):
        verify([SECRET_A], headers, BODY, now=ts - 301, tolerance_s=300)
    verify([SECRET_A], headers, BODY, now=ts + 3000, tolerance_s=3600)


@pytest.mark.parametrize("value", ["soon", "1.5", "-5", "\uff11\uff17"])
def test_timestamp_must_be_whole_unix_seconds(value: str) -> None:
    headers, body, ts = fresh_message([SECRET_A])
    with pytest.raises(InvalidSignature, match="whole number"):
        verify([SECRET_A], {**headers, "webhook-timestamp": value}, body, now=ts)


@pytest.mark.parametrize("digits", [13, 400, 5000])
def test_an_overlong_timestamp_is_an_invalid_signature_not_a_crash(digits: int) -> None:
    headers, body, ts = fresh_message([SECRET_A])
    with pytest.raises(InvalidSignature, match="digits"):
        verify([SECRET_A], {**headers, "webhook-timestamp": "9" * digits}, body, now=ts)


def test_malformed_and_foreign_entries_are_skipped_not_fatal() -> None:
    headers, body, ts = fresh_message([SECRET_A])
    noisy = f"v2,AAAA garbage v1,!!! {headers['webhook-signature']}"
    verify([SECRET_A], {**headers, "webhook-signature": noisy}, body, now=ts)


def test_a_header_without_v1_entries_says_so() -> None:
    headers, body, ts = fresh_message([SECRET_A])
    with pytest.raises(InvalidSignature, match="no well-formed v1"):
        verify([SECRET_A], {**headers, "webhook-signature": "v1a,xyz v2,AAAA"}, body, now=ts)


def test_a_bare_string_of_secrets_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        sign(SECRET_A, MSG_ID, 1, BODY)


def test_signing_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="at least one"):
        sign([], MSG_ID, 1, BODY)


@pytest.mark.parametrize("msg_id", ["", "msg_a\r\nx-injected: 1", "msg a", "msg_é"])
def test_header_unsafe_ids_are_refused(msg_id: str) -> None:
    with pytest.raises(ValueError, match="webhook-id"):
        webhook_headers([SECRET_A], msg_id, 1, BODY, USER_AGENT)


def test_webhook_id_is_deterministic_and_well_formed() -> None:
    first = new_webhook_id("watch-1", "completed", "1")
    assert first == new_webhook_id("watch-1", "completed", "1")
    assert re.fullmatch(r"msg_[a-z2-7]{32}", first)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("watch-1", "completed", "1"), ("watch-1", "completed", "2")),
        (("watch-1", "completed", "1"), ("watch-2", "completed", "1")),
        (("ab", "c"), ("a", "bc")),
        (("a",), ("a", "")),
    ],
)
def test_webhook_id_differs_for_different_parts(left: tuple[str, ...], right: tuple[str, ...]) -> None:
    assert new_webhook_id(*left) != new_webhook_id(*right)


def test_webhook_id_needs_a_part() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        new_webhook_id()


@given(body=st.binary(max_size=512), ts=st.integers(min_value=0, max_value=10**12 - 1))
def test_sign_then_verify_round_trips_any_body(body: bytes, ts: int) -> None:
    headers = webhook_headers([SECRET_A, SECRET_B], MSG_ID, ts, body, USER_AGENT)
    verify([SECRET_B], headers, body, now=ts)
    if body:
        with pytest.raises(InvalidSignature):
            verify([SECRET_B], headers, body[:-1], now=ts)


@given(
    text=st.text(st.characters(codec="utf-8"), max_size=200),
    ts=st.integers(min_value=0, max_value=2**36),
)
def test_signature_matches_the_reference_for_any_text(text: str, ts: int) -> None:
    reference = Webhook(SECRET_B).sign(MSG_ID, datetime.fromtimestamp(ts, tz=UTC), text)
    assert sign([SECRET_B], MSG_ID, ts, text.encode()) == reference
