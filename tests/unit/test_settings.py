"""Settings: defaults per the contract, and one clear error per bad value."""

from __future__ import annotations

import base64

import pytest

from worker.errors import SettingsError
from worker.settings import load_settings

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
BASE = {"CHECK365_API_KEY": "key-123", "WEBHOOK_SECRET": SECRET}


def test_defaults_are_the_contracts() -> None:
    s = load_settings(BASE)
    assert s.base_url == "https://api.check365.io"
    assert s.status_url == "https://api.check365.io/api/validation/bulk-status"
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.queue == "check365"
    assert (s.poll_initial_delay_s, s.poll_max_delay_s, s.watch_timeout_s) == (5, 300, 86400)
    assert s.webhook_retry_delays_s == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert s.webhook_max_results_per_part == 1000
    assert s.webhook_allow_http is False
    assert s.webhook_allow_private_networks is False
    assert s.broker_visibility_timeout_s == 3600


def test_fractional_durations_and_rotation_secrets() -> None:
    other = "whsec_" + base64.b64encode(b"o" * 32).decode()
    s = load_settings(
        {
            **BASE,
            "POLL_INITIAL_DELAY_S": "0.2",
            "POLL_MAX_DELAY_S": "1.5",
            "WEBHOOK_RETRY_DELAYS_S": "0.1, 0.5,2",
            "WEBHOOK_SECRET": f"{SECRET} {other}",
            "WEBHOOK_ALLOW_HTTP": "TRUE",
        }
    )
    assert s.poll_initial_delay_s == 0.2
    assert s.poll_max_delay_s == 1.5
    assert s.webhook_retry_delays_s == (0.1, 0.5, 2.0)
    assert s.webhook_secrets == (SECRET, other)
    assert s.webhook_allow_http is True


def test_secrets_stay_out_of_repr() -> None:
    text = repr(load_settings(BASE))
    assert "key-123" not in text
    assert SECRET not in text


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CHECK365_API_KEY": ""}, "CHECK365_API_KEY"),
        ({"WEBHOOK_SECRET": ""}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_SECRET": "not-a-secret"}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_SECRET": "whsec_!!!"}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"short").decode()}, "WEBHOOK_SECRET"),
        ({"POLL_MAX_DELAY_S": "abc"}, "POLL_MAX_DELAY_S"),
        ({"POLL_MAX_DELAY_S": "0"}, "POLL_MAX_DELAY_S"),
        ({"POLL_INITIAL_DELAY_S": "-1"}, "POLL_INITIAL_DELAY_S"),
        ({"POLL_INITIAL_DELAY_S": "nan"}, "POLL_INITIAL_DELAY_S"),
        ({"WATCH_TIMEOUT_S": "inf"}, "WATCH_TIMEOUT_S"),
        ({"POLL_INITIAL_DELAY_S": "400"}, "POLL_INITIAL_DELAY_S"),
        ({"WEBHOOK_RETRY_DELAYS_S": ","}, "WEBHOOK_RETRY_DELAYS_S"),
        ({"WEBHOOK_RETRY_DELAYS_S": "5,x"}, "WEBHOOK_RETRY_DELAYS_S"),
        ({"WEBHOOK_MAX_RESULTS_PER_PART": "0"}, "WEBHOOK_MAX_RESULTS_PER_PART"),
        ({"WEBHOOK_MAX_RESULTS_PER_PART": "1.5"}, "WEBHOOK_MAX_RESULTS_PER_PART"),
        ({"WEBHOOK_ALLOW_HTTP": "maybe"}, "WEBHOOK_ALLOW_HTTP"),
        ({"BROKER_VISIBILITY_TIMEOUT_S": "200"}, "BROKER_VISIBILITY_TIMEOUT_S"),
        ({"CHECK365_BASE_URL": "ftp://x"}, "CHECK365_BASE_URL"),
        ({"CHECK365_BASE_URL": "https://[::1"}, "CHECK365_BASE_URL"),
        ({"CHECK365_BASE_URL": "https://api.check365.io:abc"}, "CHECK365_BASE_URL"),
        ({"CHECK365_BASE_URL": "https://api.check365.io?region=eu"}, "CHECK365_BASE_URL"),
        ({"CHECK365_BASE_URL": "https://api.check365.io#x"}, "CHECK365_BASE_URL"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://[bad"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://:pw@redis:99999/0"}, "REDIS_URL"),
        ({"REDIS_URL": "unix://"}, "REDIS_URL"),
        ({"WATCH_TIMEOUT_S": "1e16"}, "WATCH_TIMEOUT_S"),
        ({"STATE_TTL_S": "1e300"}, "STATE_TTL_S"),
        ({"WEBHOOK_RETRY_DELAYS_S": "5,1e12"}, "WEBHOOK_RETRY_DELAYS_S"),
        ({"CHECK365_MAX_RPS": "1e9"}, "CHECK365_MAX_RPS"),
        ({"CHECK365_QUEUE": "bad queue!"}, "CHECK365_QUEUE"),
        ({"CHECK365_MAX_RPS": "0"}, "CHECK365_MAX_RPS"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, **env})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(variable + " ")


def test_a_bad_redis_url_is_never_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, "REDIS_URL": "redis://:hunter2pw@redis:port/0"})
    assert "hunter2pw" not in str(caught.value)


def test_a_redis_unix_socket_url_is_accepted() -> None:
    assert load_settings({**BASE, "REDIS_URL": "unix:///var/run/redis/redis.sock"}).redis_url.startswith("unix://")


def test_malformed_secret_is_never_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, "WEBHOOK_SECRET": "whsec_supersecret!!"})
    assert "supersecret" not in str(caught.value)


def test_client_role_needs_no_secrets() -> None:
    s = load_settings({"REDIS_URL": "redis://127.0.0.1:1/0"}, role="client")
    assert s.api_key == ""
    assert s.webhook_secrets == ()
