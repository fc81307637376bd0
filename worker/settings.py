"""Typed, frozen settings read from the environment, each declared once.

This module is the only reader of ``os.environ`` in the worker. Every setting is one
field of ``Settings``, declared with ``setting(...)``: its variable, default, parser,
one-line meaning and the processes that use it. The loader, the README's settings
table and ``config/.env.example`` all come from those declarations (a test checks the
two files; ``python -m worker.settings`` rewrites them).

Every value is validated here, at the boundary, so that a bad deployment stops at
start-up with one line naming the variable and the rule it broke, instead of failing
hours later in the middle of a watch. A value that is set is checked by every process
(they share one environment, and the first to start says what is wrong); a required
setting is required only by the processes that use it: beat and ``celery inspect`` need
neither the API key nor the webhook secret.

Adding a setting is one field::

    auth_grace_s: float = setting("CHECK365_AUTH_GRACE_S", 900.0, seconds(), "what it means", WORKER)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, cast
from urllib.parse import quote, quote_plus, urlsplit

from check365_client.endpoints import Endpoint, Endpoints, load_endpoints
from check365_client.errors import EndpointsFileError
from worker.delivery.signing import decode_secret
from worker.errors import SettingsError
from worker.polling.schedule import DEFAULT_PATIENCE, PATIENCE_MAX, PATIENCE_MIN

T = TypeVar("T")

# worker: `celery -A worker worker`; beat: `celery -A worker beat`; cli: the
# `check365-worker` commands and Celery's own control commands (`celery -A worker inspect ping`).
Process = Literal["worker", "beat", "cli"]
PROCESSES: tuple[Process, ...] = ("worker", "beat", "cli")
WORKER: frozenset[Process] = frozenset({"worker"})
ALL: frozenset[Process] = frozenset(PROCESSES)
LogFormat = Literal["auto", "json", "console"]
Parser = Callable[[str, str], T]


@dataclass(frozen=True)
class Declaration(Generic[T]):
    """What one environment variable is: the facts the loader and the docs are made from."""

    variable: str
    default: T
    parse: Parser[T]
    meaning: str
    used_by: frozenset[Process]
    required_by: frozenset[Process]
    secret: bool
    # For a required value: what it looks like, quoted in the error when it is missing.
    form: str

    @property
    def shown_default(self) -> str:
        if self.required_by:
            return f"(required by the {', '.join(p for p in PROCESSES if p in self.required_by)})"
        return format_value(self.default) or "(none)"


def setting(
    variable: str,
    default: T,
    parse: Parser[T],
    meaning: str,
    used_by: frozenset[Process] = ALL,
    *,
    required_by: frozenset[Process] = frozenset(),
    secret: bool = False,
    form: str = "",
) -> T:
    """Declare the field of ``Settings`` that ``variable`` sets."""
    declared = Declaration(variable, default, parse, meaning, used_by, required_by, secret, form)
    # Secrets are excluded from repr so that a settings object printed in a
    # traceback or a debug log never shows them.
    return field(default=default, repr=not secret, metadata={"declaration": declared})


def format_value(value: object) -> str:
    """A value as it would be written in the environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}" if value < 1e16 else repr(value)
    if isinstance(value, tuple):
        return ",".join(format_value(v) for v in value)
    return str(value)


# --- parsers: each takes the variable's name (for the error) and its stripped text ------------

# No duration is meant to reach a year; a larger one is a typo, and Redis refuses
# expiry times far beyond it only when the first watch is created.
MAX_SECONDS = 365 * 24 * 3600.0


def _parse_float(
    name: str, raw: str, *, minimum: float = 0.0, strict: bool = False, maximum: float = MAX_SECONDS
) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(name, f"must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum) or value > maximum:
        rule = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
        raise SettingsError(name, f"must be a finite number {rule} and at most {maximum:,.0f}, got {raw!r}")
    return value


def seconds(*, positive: bool = False, maximum: float = MAX_SECONDS) -> Parser[float]:
    """A duration (or rate): a finite number, at least 0 (above 0 when ``positive``), at most ``maximum``."""
    return lambda name, raw: _parse_float(name, raw, strict=positive, maximum=maximum)


def whole(*, minimum: int) -> Parser[int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(name, f"must be a whole number, got {raw!r}") from None
        if value < minimum:
            raise SettingsError(name, f"must be at least {minimum}, got {raw!r}")
        return value

    return parse


def boolean(name: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(name, f"must be true or false, got {raw!r}")


def delays(name: str, raw: str) -> tuple[float, ...]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        raise SettingsError(name, "must list at least one delay, comma-separated seconds")
    return tuple(_parse_float(name, p) for p in parts)


def url(*schemes: str, base: bool = False) -> Parser[str]:
    def parse(name: str, raw: str) -> str:
        # The value is never echoed: a Redis URL may hold a password.
        rule = f"must be an absolute {' or '.join(schemes)} URL"
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 - parsing the port is the check: it raises on 'host:abc'
        except ValueError:
            raise SettingsError(name, f"{rule}; this one does not parse (host or port)") from None
        if parts.scheme not in schemes:
            raise SettingsError(name, rule)
        if parts.scheme == "unix" and not parts.path:
            raise SettingsError(name, f"{rule}; a unix URL needs the socket's path")
        if parts.scheme != "unix" and not parts.hostname:
            raise SettingsError(name, rule)
        if base and (parts.query or parts.fragment):
            # The endpoint's path is appended to the base: a query or fragment would swallow it.
            raise SettingsError(name, f"{rule} without a query string or fragment")
        return raw

    return parse


def choice(*options: str) -> Parser[str]:
    def parse(name: str, raw: str) -> str:
        value = raw.lower()
        if value not in options:
            raise SettingsError(name, f"must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _parse_api_key(name: str, raw: str) -> str:
    if any(c.isspace() or ord(c) < 32 for c in raw):
        # Never echo the value: it is a secret, even when malformed.
        raise SettingsError(name, "must not contain whitespace or control characters")
    return raw


def secrets_problem(raw: str) -> str | None:
    """What is wrong with ``raw`` as space-separated ``whsec_`` secrets, or None.

    The one check of a secret's form, for ``WEBHOOK_SECRET`` and the endpoints file alike;
    the answer never quotes the value: it is a secret, even when malformed.
    """
    secrets = raw.split()
    if not secrets:
        return "must hold at least one whsec_<base64 key>"
    for secret in secrets:
        try:
            key = decode_secret(secret)
        except ValueError as exc:
            return str(exc)  # never quotes the secret either
        if len(key) < 16:
            return "each key must decode to at least 16 bytes"
    return None


def _parse_secrets(name: str, raw: str) -> tuple[str, ...]:
    problem = secrets_problem(raw)
    if problem is not None:
        raise SettingsError(name, problem)
    return tuple(raw.split())


def _parse_path(name: str, raw: str) -> str:
    if "\x00" in raw:
        raise SettingsError(name, "must be a file's path")
    return raw


def _parse_patience(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(name, f"must be a number, got {raw!r}") from None
    if not PATIENCE_MIN <= value <= PATIENCE_MAX:
        raise SettingsError(name, f"must be a number from {PATIENCE_MIN:g} to {PATIENCE_MAX:g}, got {raw!r}")
    return value


def _parse_queue(name: str, raw: str) -> str:
    if not raw.replace("_", "").replace("-", "").replace(".", "").isalnum() or len(raw) > 200:
        raise SettingsError(name, "must be a queue name of letters, digits, '.', '_' or '-'")
    return raw


def _parse_port(name: str, raw: str) -> int:
    port = whole(minimum=0)(name, raw)
    if port > 65535:
        raise SettingsError(name, "must be a TCP port (0 disables the endpoint)")
    return port


def _parse_address(name: str, raw: str) -> str:
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        raise SettingsError(name, f"must be an IP address to listen on, got {raw!r}") from None
    return raw


@dataclass(frozen=True)
class RegisteredEndpoints:
    """The endpoints file as the worker uses it: each endpoint with its secrets' values.

    Frozen and hashable like ``Settings``; its repr never shows a secret.
    """

    file: Endpoints = field(default_factory=Endpoints)
    secrets: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __repr__(self) -> str:
        return f"RegisteredEndpoints({[e.name for e in self.file]})"

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self.file.endpoints)

    def __len__(self) -> int:
        return len(self.file)

    def match(self, url: str) -> Endpoint | None:
        return self.file.match(url)

    def get(self, name: str) -> Endpoint | None:
        return self.file.get(name)

    def secrets_of(self, name: str) -> tuple[str, ...]:
        return next((values for n, values in self.secrets if n == name), ())

    @property
    def all_secrets(self) -> tuple[str, ...]:
        return tuple(s for _, values in self.secrets for s in values)


# --- the settings ------------------------------------------------------------------------------

_CLI: frozenset[Process] = frozenset({"worker", "cli"})
_WORKER_BEAT: frozenset[Process] = frozenset({"worker", "beat"})
_BEAT: frozenset[Process] = frozenset({"beat"})


@dataclass(frozen=True)
class Settings:
    api_key: str = setting(
        "CHECK365_API_KEY",
        "",
        _parse_api_key,
        "API key; never logged, never put into a broker message",
        _CLI,
        required_by=WORKER,
        secret=True,
    )
    base_url: str = setting(
        "CHECK365_BASE_URL",
        "https://api.check365.io",
        url("http", "https", base=True),
        "the API; the status endpoint is `{base}/api/validation/bulk-status`; `https`, except for a loopback"
        " host or with `CHECK365_ALLOW_HTTP=true`",
        _CLI,
    )
    check365_allow_http: bool = setting(
        "CHECK365_ALLOW_HTTP",
        False,
        boolean,
        "allow a plain-http `CHECK365_BASE_URL` on a host that is not loopback (the simulator in another"
        " container); the API key travels in its query",
        _CLI,
    )
    redis_url: str = setting(
        "REDIS_URL", "redis://localhost:6379/0", url("redis", "rediss", "unix"), "broker and state store"
    )
    queue: str = setting("CHECK365_QUEUE", "check365", _parse_queue, "queue of the watch tasks")
    webhook_secrets: tuple[str, ...] = setting(
        "WEBHOOK_SECRET",
        (),
        _parse_secrets,
        "`whsec_<base64 key>`; several separated by spaces while rotating keys (each signs)",
        _CLI,
        required_by=WORKER,
        secret=True,
        form="whsec_<base64 key>",
    )
    poll_initial_delay_s: float = setting(
        "POLL_INITIAL_DELAY_S", 5.0, seconds(), "delay before the first poll after enqueue...", WORKER
    )
    poll_max_delay_s: float = setting(
        "POLL_MAX_DELAY_S",
        300.0,
        seconds(positive=True),
        "...and the longest gap ever left between two polls of one job",
        WORKER,
    )
    poll_patience: float = setting(
        "POLL_PATIENCE",
        DEFAULT_PATIENCE,
        _parse_patience,
        f"where polling sits between requests and detection lag, from {PATIENCE_MIN:g} to {PATIENCE_MAX:g}: lower"
        " polls more and sees completions sooner, higher polls less (see [Polling frontier](#polling-frontier))",
        WORKER,
    )
    watch_timeout_s: float = setting(
        "WATCH_TIMEOUT_S",
        86400.0,
        seconds(positive=True),
        "when a watch gives up with `bulk_validation.timed_out`",
        WORKER,
    )
    webhook_retry_delays_s: tuple[float, ...] = setting(
        "WEBHOOK_RETRY_DELAYS_S",
        (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0),
        delays,
        "delays between delivery attempts",
        WORKER,
    )
    webhook_max_results_per_part: int = setting(
        "WEBHOOK_MAX_RESULTS_PER_PART", 1000, whole(minimum=1), "results per `completed` event", WORKER
    )
    webhook_allow_http: bool = setting("WEBHOOK_ALLOW_HTTP", False, boolean, "allow plain-http callback URLs", _CLI)
    webhook_allow_private_networks: bool = setting(
        "WEBHOOK_ALLOW_PRIVATE_NETWORKS",
        False,
        boolean,
        "allow callbacks to loopback, private, link-local and other non-global addresses",
        _CLI,
    )
    webhook_endpoints_file: str = setting(
        "WEBHOOK_ENDPOINTS_FILE",
        "",
        _parse_path,
        "path of the endpoints file: the receivers, each with its own secret (see [Endpoints](#endpoints))",
        _CLI,
    )
    webhook_endpoints_only: bool = setting(
        "WEBHOOK_ENDPOINTS_ONLY",
        False,
        boolean,
        "refuse callback URLs that match no endpoint of the file",
        _CLI,
    )
    broker_visibility_timeout_s: float = setting(
        "BROKER_VISIBILITY_TIMEOUT_S",
        3600.0,
        seconds(positive=True),
        "Redis broker visibility timeout; must exceed `POLL_MAX_DELAY_S`, and bounds how long a crashed"
        " worker's watches wait",
    )
    # Beyond the contract: tuning knobs with safe defaults.
    check365_max_rps: float = setting(
        "CHECK365_MAX_RPS",
        4.0,
        seconds(positive=True, maximum=1e6),
        "requests per second to Check365 for the whole pool, on every host together (see [Performance](#performance))",
        WORKER,
    )
    check365_timeout_s: float = setting(
        "CHECK365_TIMEOUT_S",
        30.0,
        seconds(positive=True),
        "read timeout of a bulk-status request (connect: 10); the whole answer must arrive within twice this",
        WORKER,
    )
    webhook_timeout_s: float = setting(
        "WEBHOOK_TIMEOUT_S",
        15.0,
        seconds(positive=True),
        "timeout of one webhook attempt; the receiver's status line counts, its body is read for at most twice this",
        WORKER,
    )
    webhook_endpoint_max_in_flight: int = setting(
        "WEBHOOK_ENDPOINT_MAX_IN_FLIGHT",
        16,
        whole(minimum=1),
        "attempts in flight towards one endpoint (scheme, host and port of the callback URL), for the whole "
        "pool together (see [Guarantees](#one-receiver-cannot-hold-the-pool))",
        _CLI,
    )
    webhook_breaker_threshold: int = setting(
        "WEBHOOK_BREAKER_THRESHOLD",
        5,
        whole(minimum=1),
        "consecutive failed attempts that open an endpoint's circuit breaker",
        _CLI,
    )
    webhook_breaker_cooldown_s: float = setting(
        "WEBHOOK_BREAKER_COOLDOWN_S",
        30.0,
        seconds(positive=True),
        "how long an open breaker waits before its first probe; doubled after each failed probe, up to 32 times this",
        WORKER,
    )
    sweep_interval_s: float = setting(
        "SWEEP_INTERVAL_S",
        15.0,
        seconds(positive=True),
        "how often beat runs the sweep that re-arms lost messages and dispatches long retries",
        _BEAT,
    )
    rearm_grace_s: float = setting(
        "REARM_GRACE_S",
        60.0,
        seconds(),
        "how late a scheduled poll or delivery may be before the sweep re-arms it",
        WORKER,
    )
    auth_grace_s: float = setting(
        "CHECK365_AUTH_GRACE_S",
        900.0,
        seconds(),
        "a refused API key pauses polling for the whole pool (an operator's fault, not the job's); "
        "watches fail with `unauthorized` only once the key has been refused this long",
        WORKER,
    )
    state_ttl_s: float = setting(
        "STATE_TTL_S",
        7 * 86400.0,
        seconds(positive=True),
        "how long finished watches and delivered events stay inspectable",
        _CLI,
    )
    log_format: LogFormat = setting(
        "LOG_FORMAT",
        "auto",
        cast(Parser[LogFormat], choice("auto", "json", "console")),
        "`json`, `console`, or `auto` (console on a terminal, JSON otherwise)",
        _WORKER_BEAT,
    )
    log_level: str = setting(
        "LOG_LEVEL",
        "info",
        choice("debug", "info", "warning", "error"),
        "`debug`, `info`, `warning`, `error`",
        _WORKER_BEAT,
    )
    metrics_port: int = setting(
        "METRICS_PORT", 0, _parse_port, "Prometheus metrics port of each `celery worker` (0: off)", WORKER
    )
    # All interfaces by default: a scraper reaches the worker from outside its container.
    metrics_addr: str = setting(
        "METRICS_ADDR",
        "0.0.0.0",  # noqa: S104
        _parse_address,
        "address the metrics endpoint listens on",
        WORKER,
    )

    # Read from WEBHOOK_ENDPOINTS_FILE (not a variable of its own): the endpoints, and each
    # one's secrets as resolved at start-up (``secret`` or its ``secret_env`` variable).
    endpoints: RegisteredEndpoints = field(default_factory=RegisteredEndpoints, repr=False)

    @property
    def status_url(self) -> str:
        return self.base_url.rstrip("/") + "/api/validation/bulk-status"

    @cached_property
    def redacted_values(self) -> tuple[str, ...]:
        """Every secret string that must never reach a log line or exception text.

        Each secret in every spelling it may come back in: the API key travels
        percent-encoded in a query string, and a server quoting its request quotes
        that form.
        """
        every = (*self.webhook_secrets, *self.endpoints.all_secrets)
        values = [self.api_key, *every, *(s.removeprefix("whsec_") for s in every)]
        return tuple(dict.fromkeys(form for v in values if v for form in url_spellings(v)))


def declarations() -> tuple[tuple[str, Declaration[Any]], ...]:
    """Every setting, in the order of ``Settings``: (field name, declaration)."""
    return tuple((f.name, f.metadata["declaration"]) for f in dataclasses.fields(Settings) if f.metadata)


VARIABLES: tuple[str, ...] = tuple(d.variable for _, d in declarations())

_ESCAPE = re.compile(r"%[0-9A-F]{2}")


def url_spellings(value: str) -> tuple[str, ...]:
    """``value`` as written and as URLs carry it, with upper- and lower-case escapes."""
    encoded = (quote_plus(value), quote(value, safe=""))
    lower = tuple(_ESCAPE.sub(lambda m: m.group().lower(), e) for e in encoded)
    return tuple(dict.fromkeys((value, *encoded, *lower)))


def load_settings(environ: Mapping[str, str] | None = None, *, process: Process = "worker") -> Settings:
    """Read and validate every setting for ``process``.

    An unset or empty variable means its default; a required one is required only by
    the processes its declaration names.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, declared in declarations():
        raw = (env.get(declared.variable) or "").strip()
        if raw:
            values[name] = declared.parse(declared.variable, raw)
        elif process in declared.required_by:
            form = f" ({declared.form})" if declared.form else ""
            raise SettingsError(declared.variable, f"is required by the {process}{form}")
    # Beat never reads the file; the others would refuse every callback URL without one.
    if values.get("webhook_endpoints_file") and process != "beat":
        values["endpoints"] = _registered_endpoints(values["webhook_endpoints_file"], env)
    elif values.get("webhook_endpoints_only") and process != "beat":
        raise SettingsError("WEBHOOK_ENDPOINTS_ONLY", "needs WEBHOOK_ENDPOINTS_FILE: no endpoint is registered")
    settings = Settings(**values)
    _check_relations(settings)
    return settings


_ENDPOINTS_FILE = "WEBHOOK_ENDPOINTS_FILE"


def _registered_endpoints(path: str, env: Mapping[str, str]) -> RegisteredEndpoints:
    """The endpoints file with every secret resolved and checked; SettingsError naming the endpoint and key."""
    try:
        endpoints = load_endpoints(path)
    except EndpointsFileError as exc:
        raise SettingsError(_ENDPOINTS_FILE, str(exc)) from None
    secrets: list[tuple[str, tuple[str, ...]]] = []
    for endpoint in endpoints:
        if endpoint.secret_env is not None:
            key, raw = "secret_env", (env.get(endpoint.secret_env) or "").strip()
            if not raw:
                where = EndpointsFileError(
                    f"the variable {endpoint.secret_env} is not set", endpoint=endpoint.name, key=key
                )
                raise SettingsError(_ENDPOINTS_FILE, str(where))
        else:
            key, raw = "secret", endpoint.secret or ""
        problem = secrets_problem(raw)
        if problem is not None:
            if key == "secret_env":
                problem = f"the variable {endpoint.secret_env}: {problem}"
            raise SettingsError(_ENDPOINTS_FILE, str(EndpointsFileError(problem, endpoint=endpoint.name, key=key)))
        secrets.append((endpoint.name, tuple(raw.split())))
    return RegisteredEndpoints(endpoints, tuple(secrets))


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_relations(s: Settings) -> None:
    # The API key travels in the status URL's query: in clear text over plain http.
    base = urlsplit(s.base_url)
    if base.scheme == "http" and not s.check365_allow_http and not _is_loopback(base.hostname):
        raise SettingsError(
            "CHECK365_BASE_URL",
            "must be https: the API key travels in its query (plain http only for a loopback host,"
            " or with CHECK365_ALLOW_HTTP=true)",
        )
    if s.poll_initial_delay_s > s.poll_max_delay_s:
        raise SettingsError("POLL_INITIAL_DELAY_S", "must not exceed POLL_MAX_DELAY_S")
    # A countdown longer than the visibility timeout is re-delivered by kombu
    # while still waiting, so every countdown must stay well inside it.
    if s.broker_visibility_timeout_s <= s.poll_max_delay_s:
        raise SettingsError("BROKER_VISIBILITY_TIMEOUT_S", "must exceed POLL_MAX_DELAY_S")


# --- the documents made from the declarations --------------------------------------------------

TABLE_BEGIN = "<!-- settings table: generated from worker/settings.py by `python -m worker.settings` -->"
TABLE_END = "<!-- end of settings table -->"


def markdown_table() -> str:
    rows = ["| variable | default | used by | meaning |", "| --- | --- | --- | --- |"]
    for _, d in declarations():
        plain = d.required_by or not format_value(d.default)  # "(required by ...)", "(none)"
        default = d.shown_default if plain else f"`{d.shown_default}`"
        used_by = ", ".join(p for p in PROCESSES if p in d.used_by)
        rows.append(f"| `{d.variable}` | {default} | {used_by} | {d.meaning} |")
    return "\n".join(rows)


def env_example() -> str:
    lines = [
        "# check365-worker settings. Copy to `.env` next to docker-compose.yml (Compose reads it) and fill in",
        "# the required values; every commented line shows a default. Generated from worker/settings.py by",
        "# `python -m worker.settings`: edit the declarations there, not this file.",
        "# Processes: worker = celery -A worker worker; beat = celery -A worker beat;",
        "# cli = check365-worker and celery's control commands (celery -A worker inspect ping).",
    ]
    for _, d in declarations():
        used_by = ", ".join(p for p in PROCESSES if p in d.used_by)
        lines += ["", f"# {d.meaning.replace('`', '')} [used by: {used_by}]"]
        if d.required_by:
            lines.append(f"{d.variable}=")
        else:
            lines.append(f"# {d.variable}={format_value(d.default)}")
    return "\n".join(lines) + "\n"


def readme_with_table(readme: str) -> str:
    """``readme`` with the text between the table's markers replaced by the generated table."""
    head, begin, rest = readme.partition(TABLE_BEGIN)
    _, end, tail = rest.partition(TABLE_END)
    if not begin or not end:
        raise ValueError("README.md lacks the settings table's markers")
    return f"{head}{TABLE_BEGIN}\n{markdown_table()}\n{TABLE_END}{tail}"


def write_documents(root: Path) -> None:
    readme = root / "README.md"
    readme.write_text(readme_with_table(readme.read_text(encoding="utf-8")), encoding="utf-8")
    example = root / "config" / ".env.example"
    example.parent.mkdir(exist_ok=True)
    example.write_text(env_example(), encoding="utf-8")


if __name__ == "__main__":
    write_documents(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd())
