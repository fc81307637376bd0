"""Settings: defaults per the contract, and one clear error per bad value."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from worker.delivery.signing import decode_secret
from worker.errors import SettingsError
from worker.polling.schedule import DEFAULT_PATIENCE
from worker.settings import (
    TABLE_BEGIN,
    TABLE_END,
    VARIABLES,
    Process,
    Settings,
    declarations,
    env_example,
    format_value,
    load_settings,
    markdown_table,
    readme_with_table,
    write_documents,
)

ROOT = Path(__file__).resolve().parents[2]

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
        ({"POLL_PATIENCE": "abc"}, "POLL_PATIENCE"),
        ({"POLL_PATIENCE": "0"}, "POLL_PATIENCE"),
        ({"POLL_PATIENCE": "-1"}, "POLL_PATIENCE"),
        ({"POLL_PATIENCE": "nan"}, "POLL_PATIENCE"),
        ({"POLL_PATIENCE": "inf"}, "POLL_PATIENCE"),
        ({"POLL_PATIENCE": "0.01"}, "POLL_PATIENCE"),
        ({"POLL_PATIENCE": "1000"}, "POLL_PATIENCE"),
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


@pytest.mark.parametrize("process", ["worker", "beat", "cli"])
@pytest.mark.parametrize("url", ["http://api.check365.io", "http://simulator:8365", "http://10.0.0.5/check365"])
def test_a_plain_http_check365_url_off_loopback_is_refused(process: Process, url: str) -> None:
    # The API key travels in the status URL's query: over http, in clear text.
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, "CHECK365_BASE_URL": url}, process=process)
    assert caught.value.variable == "CHECK365_BASE_URL"
    assert "must be https" in str(caught.value)
    assert "CHECK365_ALLOW_HTTP=true" in str(caught.value)
    assert url not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8365", "http://127.0.0.2:8365/", "http://localhost:8365", "http://[::1]:8365"]
)
def test_a_plain_http_check365_url_on_loopback_is_accepted(url: str) -> None:
    assert load_settings({**BASE, "CHECK365_BASE_URL": url}).base_url == url


def test_check365_allow_http_allows_any_plain_http_host() -> None:
    env = {**BASE, "CHECK365_BASE_URL": "http://simulator:8365", "CHECK365_ALLOW_HTTP": "true"}
    settings = load_settings(env)
    assert (settings.base_url, settings.check365_allow_http) == ("http://simulator:8365", True)
    assert load_settings({**BASE, "CHECK365_BASE_URL": "https://api.example.com"}).check365_allow_http is False


def test_a_redis_unix_socket_url_is_accepted() -> None:
    assert load_settings({**BASE, "REDIS_URL": "unix:///var/run/redis/redis.sock"}).redis_url.startswith("unix://")


def test_malformed_secret_is_never_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, "WEBHOOK_SECRET": "whsec_supersecret!!"})
    assert "supersecret" not in str(caught.value)


@pytest.mark.parametrize("secret", ["not-a-secret", "whsec_!!!", "whsec_"])
def test_settings_refuse_a_secret_with_signings_own_reason(secret: str) -> None:
    # One parser of whsec_ secrets: the settings say what signing says, never the value.
    with pytest.raises(ValueError, match="secret") as signing:
        decode_secret(secret)
    with pytest.raises(SettingsError) as settings:
        load_settings({**BASE, "WEBHOOK_SECRET": secret})
    assert str(settings.value) == f"WEBHOOK_SECRET {signing.value}"


@pytest.mark.parametrize("process", ["beat", "cli"])
def test_only_the_worker_requires_the_secrets(process: Process) -> None:
    s = load_settings({"REDIS_URL": "redis://127.0.0.1:1/0"}, process=process)
    assert s.api_key == ""
    assert s.webhook_secrets == ()
    with pytest.raises(SettingsError, match=r"^CHECK365_API_KEY is required by the worker$"):
        load_settings({"REDIS_URL": "redis://127.0.0.1:1/0"}, process="worker")
    with pytest.raises(SettingsError, match=r"^WEBHOOK_SECRET is required by the worker \(whsec_<base64 key>\)$"):
        load_settings({"CHECK365_API_KEY": "key-123"}, process="worker")


@pytest.mark.parametrize("process", ["beat", "cli"])
def test_a_bad_value_stops_every_process_that_reads_the_environment(process: Process) -> None:
    # One environment serves every process: whichever starts first names the mistake.
    with pytest.raises(SettingsError, match=r"^WEBHOOK_SECRET "):
        load_settings({"WEBHOOK_SECRET": "not-a-secret"}, process=process)


# --- each setting declared once ----------------------------------------------------------------


def test_every_declaration_is_complete_and_its_default_survives_a_round_trip() -> None:
    seen: set[str] = set()
    for name, declared in declarations():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+", declared.variable), name
        assert declared.variable not in seen, f"{declared.variable} is declared twice"
        seen.add(declared.variable)
        assert declared.meaning.strip(), f"{declared.variable} has no meaning"
        assert declared.used_by, f"{declared.variable} is used by no process"
        assert declared.required_by <= declared.used_by, declared.variable
        if not declared.required_by:
            # The documented default, written back into the environment, means the same thing.
            text = format_value(declared.default)
            assert declared.parse(declared.variable, text) == declared.default, declared.variable
            assert getattr(load_settings({**BASE, declared.variable: text}), name) == declared.default


def test_an_unset_or_blank_variable_means_its_default() -> None:
    blank = {d.variable: "  " for _, d in declarations() if not d.required_by}
    assert (
        load_settings({**BASE, **blank})
        == load_settings(BASE)
        == Settings(api_key="key-123", webhook_secrets=(SECRET,))
    )


def test_the_readme_table_is_generated_from_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_with_table(readme) == readme, "README.md's settings table is stale: run python -m worker.settings"
    for _, declared in declarations():
        assert f"| `{declared.variable}` |" in readme


def test_the_env_example_is_generated_from_the_declarations() -> None:
    example = (ROOT / "config" / ".env.example").read_text(encoding="utf-8")
    assert example == env_example(), "config/.env.example is stale: run python -m worker.settings"
    # Read as an environment (what Compose does with a .env), it needs only the secrets filled in.
    assigned = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert assigned == {"CHECK365_API_KEY": "", "WEBHOOK_SECRET": ""}
    commented = {line[2:].split("=", 1)[0] for line in example.splitlines() if re.match(r"# [A-Z0-9_]+=", line)}
    assert commented | set(assigned) == set(VARIABLES)


def test_the_generator_rewrites_both_documents(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(f"# x\n\n{TABLE_BEGIN}\n| stale |\n{TABLE_END}\n\nafter\n", encoding="utf-8")
    write_documents(tmp_path)
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "| stale |" not in readme
    assert readme == f"# x\n\n{TABLE_BEGIN}\n{markdown_table()}\n{TABLE_END}\n\nafter\n"
    assert (tmp_path / "config" / ".env.example").read_text(encoding="utf-8") == env_example()


def test_poll_patience_defaults_to_the_schedules_default_and_takes_fractions() -> None:
    assert load_settings(BASE).poll_patience == DEFAULT_PATIENCE
    assert load_settings({**BASE, "POLL_PATIENCE": " 0.25 "}).poll_patience == 0.25
    assert load_settings({**BASE, "POLL_PATIENCE": "30"}).poll_patience == 30.0
