"""The endpoints file as the worker uses it: secrets resolved and checked at start-up, the
policy of each callback URL (secrets, flags, retry delays, timeout), and the limits that
keep an endpoint's longer timeout inside every lease."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from check365_client import Check365Client, EndpointsFileError, UnregisteredEndpoint, UnsafeCallbackURL, enqueue_watch
from check365_client.endpoints import load_endpoints
from tests.support.schemas import assert_events_valid
from tests.support.settings import TEST_SECRET, make_settings
from worker.delivery.events import sample_event
from worker.delivery.limits import default_limits, retry_span_s
from worker.delivery.policy import longest_timeout_s, policy_for
from worker.delivery.signing import fingerprint
from worker.delivery.step import retry_delay, send_attempt
from worker.delivery.urls import endpoint_key
from worker.errors import SettingsError, UnregisteredCallback
from worker.ops.receivers import EVENT_TYPES, parse_since
from worker.runtime.context import WebhookClients
from worker.runtime.leases import attempt_budget_s, delivery_lease_s, delivery_time_limit_s, watch_time_limit_s
from worker.settings import Settings

BILLING = "whsec_" + base64.b64encode(b"billing-key-0123456789abcdef").decode()
BILLING_NEXT = "whsec_" + base64.b64encode(b"billing-key-rotated-0123456").decode()
CRM = "whsec_" + base64.b64encode(b"crm-key-0123456789abcdef0123").decode()

FILE = f"""
[endpoints.billing]
url = "https://billing.example.com/hooks/check365"
secret_env = "BILLING_WEBHOOK_SECRET"
retry_delays_s = [1, 2]
timeout_s = 120

[endpoints.crm]
url = "http://crm.internal:8080/check365"
secret = "{CRM}"
allow_http = true
allow_private_networks = true
"""


def write(tmp_path: Path, text: str = FILE) -> str:
    path = tmp_path / "endpoints.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def settings_with(tmp_path: Path, text: str = FILE, **env: str | None) -> Settings:
    values: dict[str, str | None] = {"WEBHOOK_ENDPOINTS_FILE": write(tmp_path, text), "BILLING_WEBHOOK_SECRET": BILLING}
    return make_settings({**values, **env})


def test_secrets_are_resolved_inline_and_from_secret_env(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, BILLING_WEBHOOK_SECRET=f"{BILLING} {BILLING_NEXT}")
    assert settings.endpoints.secrets_of("billing") == (BILLING, BILLING_NEXT)
    assert settings.endpoints.secrets_of("crm") == (CRM,)
    assert [e.name for e in settings.endpoints] == ["billing", "crm"]


@pytest.mark.parametrize(
    ("text", "env", "names"),
    [
        (FILE, {"BILLING_WEBHOOK_SECRET": None}, ("'billing'", "'secret_env'", "BILLING_WEBHOOK_SECRET")),
        (FILE, {"BILLING_WEBHOOK_SECRET": "not-a-secret"}, ("'billing'", "'secret_env'", "whsec_")),
        (FILE.replace(CRM, "whsec_%%%"), {}, ("'crm'", "'secret'", "base64")),
        (FILE.replace(CRM, "whsec_" + base64.b64encode(b"short").decode()), {}, ("'crm'", "'secret'", "16 bytes")),
        (
            FILE + "\n[endpoints.x]\nurl = 'https://x.example'\nsecret = 'whsec_x'\ncolour = 1\n",
            {},
            ("'x'", "'colour'"),
        ),
        (FILE + "\n[endpoints.y\n", {}, ("not valid TOML",)),
    ],
)
def test_a_bad_file_stops_start_up_naming_the_variable_the_endpoint_and_the_key(
    tmp_path: Path, text: str, env: dict[str, str | None], names: tuple[str, ...]
) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_with(tmp_path, text, **env)
    assert caught.value.variable == "WEBHOOK_ENDPOINTS_FILE"
    for name in names:
        assert name in str(caught.value)
    # The secret is never quoted, even when it is malformed.
    assert "not-a-secret" not in str(caught.value)
    assert CRM.removeprefix("whsec_") not in str(caught.value)


def test_a_missing_file_and_an_allow_list_without_a_file_stop_start_up(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"WEBHOOK_ENDPOINTS_FILE.*cannot be read"):
        make_settings(WEBHOOK_ENDPOINTS_FILE=str(tmp_path / "absent.toml"))
    with pytest.raises(SettingsError, match="WEBHOOK_ENDPOINTS_ONLY needs WEBHOOK_ENDPOINTS_FILE"):
        make_settings(WEBHOOK_ENDPOINTS_ONLY="true")
    # Beat reads no callback URL: neither stops it.
    make_settings(WEBHOOK_ENDPOINTS_FILE=str(tmp_path / "absent.toml"), WEBHOOK_ENDPOINTS_ONLY="true", process="beat")


def test_endpoint_secrets_are_redacted_and_never_in_the_settings_repr(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, BILLING_WEBHOOK_SECRET=f"{BILLING} {BILLING_NEXT}")
    for secret in (BILLING, BILLING_NEXT, CRM):
        assert secret in settings.redacted_values
        assert secret.removeprefix("whsec_") in settings.redacted_values
        assert secret.removeprefix("whsec_") not in repr(settings)
        assert secret.removeprefix("whsec_") not in repr(settings.endpoints)
        assert secret.removeprefix("whsec_") not in repr(list(settings.endpoints))


def test_each_url_gets_its_endpoints_secrets_and_overrides_and_others_the_pools(tmp_path: Path) -> None:
    settings = settings_with(tmp_path)
    billing = policy_for(settings, "https://BILLING.example.com:443/hooks/check365/orders?x=1")
    assert (billing.endpoint, billing.secrets) == ("billing", (BILLING,))
    assert billing.retry_delays_s == (1.0, 2.0)
    assert billing.timeout_s == 120.0
    assert (billing.allow_http, billing.allow_private) == (False, False)
    crm = policy_for(settings, "http://crm.internal:8080/check365")
    assert (crm.endpoint, crm.secrets, crm.allow_http, crm.allow_private) == ("crm", (CRM,), True, True)
    # Not on a / boundary: not the endpoint's.
    other = policy_for(settings, "https://billing.example.com/hooks/check365-evil")
    assert (other.endpoint, other.secrets) == (None, (TEST_SECRET,))
    assert other.retry_delays_s == settings.webhook_retry_delays_s
    assert other.timeout_s == settings.webhook_timeout_s
    assert BILLING not in repr(billing)


def test_with_the_allow_list_a_url_of_no_endpoint_is_refused(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, WEBHOOK_ENDPOINTS_ONLY="true")
    with pytest.raises(UnregisteredCallback) as caught:
        policy_for(settings, "https://hooks.example.com/check365")
    assert caught.value.reason == "unregistered_endpoint"
    assert policy_for(settings, "https://billing.example.com/hooks/check365").endpoint == "billing"


def test_an_endpoints_retry_delays_replace_the_pools(tmp_path: Path) -> None:
    settings = settings_with(tmp_path)
    delays = policy_for(settings, "https://billing.example.com/hooks/check365").retry_delays_s
    assert retry_delay(1, settings, None, 0.0, delays=delays) == 1.0
    assert retry_delay(2, settings, None, 0.0, delays=delays) == 2.0
    assert retry_delay(3, settings, None, 0.0, delays=delays) is None
    assert retry_delay(3, settings, None, 0.0) == settings.webhook_retry_delays_s[2]


def test_an_endpoint_timeout_longer_than_the_pools_is_folded_into_every_limit_and_lease(tmp_path: Path) -> None:
    plain = make_settings()
    settings = settings_with(tmp_path)
    assert longest_timeout_s(plain) == plain.webhook_timeout_s
    assert longest_timeout_s(settings) == 120.0
    billing = policy_for(settings, "https://billing.example.com/hooks/check365")
    # The attempt of the slowest endpoint fits inside the task's hard limit, which fits inside the lease.
    assert attempt_budget_s(billing) < delivery_time_limit_s(settings) < delivery_lease_s(settings)
    assert attempt_budget_s(billing) < watch_time_limit_s(settings)
    assert delivery_time_limit_s(plain) < delivery_time_limit_s(settings)


def _capture(settings: Settings, url: str) -> httpx.Request:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    clients = WebhookClients(settings, transport=httpx.MockTransport(handler))
    attempt = send_attempt(
        clients,
        settings,
        url=url,
        webhook_id="msg_1",
        body=b'{"a":1}',
        now=time.time(),
        resolver=lambda h, p: ["8.8.8.8"],
    )
    assert attempt.ok, attempt
    (request,) = seen
    return request


def _verifies(secret: str, request: httpx.Request) -> bool:
    try:
        Webhook(secret).verify(request.content, dict(request.headers.items()))
    except Exception:
        return False
    return True


def test_an_endpoints_events_carry_only_its_secrets_signatures_and_its_timeout(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, BILLING_WEBHOOK_SECRET=f"{BILLING} {BILLING_NEXT}")
    request = _capture(settings, "https://billing.example.com/hooks/check365/x")
    assert len(request.headers["webhook-signature"].split()) == 2
    assert _verifies(BILLING, request) and _verifies(BILLING_NEXT, request)
    assert not _verifies(CRM, request) and not _verifies(TEST_SECRET, request)
    assert request.extensions["timeout"]["read"] == 120.0

    other = _capture(settings, "https://hooks.example.com/check365")
    assert _verifies(TEST_SECRET, other) and not _verifies(BILLING, other)
    assert other.extensions["timeout"]["read"] == settings.webhook_timeout_s


def test_a_private_endpoint_is_let_in_while_the_pools_flags_stay_off(tmp_path: Path) -> None:
    settings = settings_with(tmp_path)
    assert not settings.webhook_allow_http and not settings.webhook_allow_private_networks
    seen: list[httpx.Request] = []
    clients = WebhookClients(settings, transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200)))

    def attempt(url: str, address: str) -> object:
        return send_attempt(
            clients, settings, url=url, webhook_id="msg_1", body=b"{}", now=1.8e9, resolver=lambda h, p: [address]
        )

    assert attempt("http://crm.internal:8080/check365/x", "10.0.0.7").ok  # type: ignore[attr-defined]
    assert seen[0].url.host == "10.0.0.7"
    # Every other URL still meets the SSRF rules, DNS pinning included.
    refused = attempt("https://hooks.example.com/x", "10.0.0.7")
    assert refused.unsafe and "not a public address" in (refused.error or "")  # type: ignore[attr-defined]
    assert attempt("http://hooks.example.com/x", "8.8.8.8").unsafe  # type: ignore[attr-defined]
    assert len(seen) == 1


def test_fingerprints_tell_secrets_apart_without_showing_them() -> None:
    assert fingerprint(BILLING) != fingerprint(BILLING_NEXT)
    assert fingerprint(BILLING) == fingerprint(BILLING)
    assert fingerprint(BILLING).startswith("sha256:") and len(fingerprint(BILLING)) == 23
    assert BILLING.removeprefix("whsec_") not in fingerprint(BILLING)


def test_the_producer_client_given_the_file_refuses_an_unregistered_url_before_sending(tmp_path: Path) -> None:
    path = write(tmp_path)
    # Nothing listens there: reaching the broker would raise BrokerUnavailable instead.
    client = Check365Client("redis://127.0.0.1:9/0", endpoints_file=path)
    with pytest.raises(UnregisteredEndpoint):
        client.enqueue_watch("J-1", "https://hooks.example.com/check365")
    with pytest.raises(UnsafeCallbackURL):  # the endpoint's flags are its own, not the pool's
        client.enqueue_watch("J-1", "http://hooks.example.com/check365")
    assert load_endpoints(path).match("http://crm.internal:8080/check365/a") is not None


@pytest.mark.parametrize("kind", ["completed", "failed", "timed_out"])
def test_a_sample_event_is_valid_against_its_schema_marked_as_a_test_and_unique(kind: str) -> None:
    event_type = EVENT_TYPES[kind]
    first = sample_event(event_type, now=time.time(), nonce="a1")
    second = sample_event(event_type, now=time.time(), nonce="b2")
    assert_events_valid([first.body, second.body])
    body = json.loads(first.body)
    assert body["type"] == event_type and body["data"]["test"] is True
    assert first.webhook_id != second.webhook_id
    with pytest.raises(ValueError, match="no event type"):
        sample_event("bulk_validation.unknown", now=0.0, nonce="x")


def test_since_takes_an_iso_time_unix_seconds_or_a_duration_ago() -> None:
    now = 1_800_000_000.0
    assert parse_since("6h", now) == now - 6 * 3600
    assert parse_since("2d", now) == now - 2 * 86400
    assert parse_since("1700000000", now) == 1_700_000_000.0
    assert parse_since("2026-12-04T10:00:00Z", now) == 1_796_378_400.0
    for bad in ("yesterday", "2026-12-04T10:00:00", "nan", "inf", ""):
        with pytest.raises(ValueError, match="--since"):
            parse_since(bad, now)


def test_the_example_endpoints_file_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "endpoints.example.toml"
    settings = make_settings(WEBHOOK_ENDPOINTS_FILE=str(example), WEBHOOK_ENDPOINTS_ONLY="true")
    assert [e.name for e in settings.endpoints] == ["billing", "crm"]
    assert len(settings.endpoints.secrets_of("billing")) == 2
    assert policy_for(settings, "http://crm.internal:8080/check365/x").allow_private


def test_an_endpoints_cap_and_breaker_threshold_apply_to_its_scheme_host_and_port(tmp_path: Path) -> None:
    text = FILE.replace("timeout_s = 120\n", "timeout_s = 120\nmax_in_flight = 3\nbreaker_threshold = 2\n")
    text += (
        f'\n[endpoints.billing-admin]\nurl = "https://billing.example.com/admin"\nsecret = "{CRM}"\nmax_in_flight = 5\n'
    )
    settings = settings_with(tmp_path, text)
    limits_for = default_limits(settings)
    billing = limits_for(endpoint_key("https://billing.example.com/hooks/check365"))
    # Two named endpoints share the key: the strictest value of each holds.
    assert (billing.max_in_flight, billing.breaker_threshold) == (3, 2)
    crm = limits_for(endpoint_key("http://crm.internal:8080/check365"))
    other = limits_for(endpoint_key("https://hooks.example.com/x"))
    assert crm == other
    assert (other.max_in_flight, other.breaker_threshold) == (
        settings.webhook_endpoint_max_in_flight,
        settings.webhook_breaker_threshold,
    )


def test_an_endpoints_retry_schedule_is_its_span_for_waiting_in_line(tmp_path: Path) -> None:
    settings = settings_with(tmp_path)
    billing = policy_for(settings, "https://billing.example.com/hooks/check365").retry_delays_s
    assert retry_span_s(settings, billing) == 3.0
    assert retry_span_s(settings) == sum(settings.webhook_retry_delays_s)


def test_enqueue_watch_given_the_file_refuses_an_unregistered_url_before_sending(tmp_path: Path) -> None:
    path = write(tmp_path)
    with pytest.raises(UnregisteredEndpoint):
        enqueue_watch(
            "J-1", "https://hooks.example.com/check365", broker_url="redis://127.0.0.1:9/0", endpoints_file=path
        )
    with pytest.raises(EndpointsFileError) as caught:
        enqueue_watch("J-1", "https://hooks.example.com/x", broker_url="redis://127.0.0.1:9/0", endpoints_file=tmp_path)
    assert "cannot be read" in str(caught.value)
