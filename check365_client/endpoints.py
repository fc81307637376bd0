"""The endpoints file: the receivers an operator registers, and which one a callback URL belongs to.

The file is TOML (contract section 5)::

    [endpoints.billing]
    url = "https://billing.example.com/hooks/check365"
    secret_env = "BILLING_WEBHOOK_SECRET"      # or: secret = "whsec_... whsec_..."

    [endpoints.crm]
    url = "http://crm.internal:8080/check365"
    secret = "whsec_..."
    allow_http = true
    allow_private_networks = true

This module reads the file's structure and matches URLs; it never reads a secret's value
(``secret_env`` is only a name here) because producers check their callback URLs against
the file without holding any receiver's secret. The worker resolves and checks the secrets.

A callback URL belongs to the endpoint whose ``url`` is its longest prefix, both compared
normalised (``normalise_url``): scheme and host lower-case, default port dropped, IPv6
literals in canonical form, unreserved percent-escapes decoded, dot segments removed. A
prefix ends at a ``/`` boundary: ``/hooks/check365`` holds ``/hooks/check365`` and
``/hooks/check365/x``, not ``/hooks/check365-evil``. Query strings play no part.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from check365_client.errors import EndpointsFileError, UnregisteredEndpoint

_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# RFC 3986 2.3: escapes of these characters mean the characters themselves.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Settings are capped like their environment counterparts: a year at most.
_MAX_SECONDS = 366 * 86400.0
_MAX_DELAYS = 50

KNOWN_KEYS = frozenset(
    {
        "url",
        "secret",
        "secret_env",
        "allow_http",
        "allow_private_networks",
        "max_in_flight",
        "breaker_threshold",
        "retry_delays_s",
        "timeout_s",
    }
)


@dataclass(frozen=True)
class NormalisedURL:
    scheme: str
    host: str  # lower-case; an IPv6 literal compressed and in brackets; no trailing dot
    port: int  # always explicit here, so that https://h and https://h:443 compare equal
    path: str  # starts with "/"; dot segments removed; unreserved escapes decoded

    @property
    def origin(self) -> str:
        default = _DEFAULT_PORTS[self.scheme]
        return f"{self.scheme}://{self.host}" + ("" if self.port == default else f":{self.port}")

    def __str__(self) -> str:
        return self.origin + self.path


def _decode_unreserved(path: str) -> str:
    def fix(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return _ESCAPE.sub(fix, path)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, for an absolute path."""
    output: list[str] = []
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


def normalise_url(url: str) -> NormalisedURL:
    """The comparable form of an absolute http(s) URL; ValueError if it is not one.

    URLs with userinfo (``user:pass@``) are refused: they never match an endpoint.
    """
    if not isinstance(url, str):
        raise ValueError("not a URL")
    return _normalise_text(str(url))


# Every job's URL is matched against the endpoints at its start, polls and deliveries.
@functools.lru_cache(maxsize=1024)
def _normalise_text(url: str) -> NormalisedURL:
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("not a URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.netloc:
        raise ValueError("not an absolute http(s) URL")
    if "@" in parts.netloc:
        raise ValueError("has user:password@")
    host = (parts.hostname or "").removesuffix(".")
    if not host:
        raise ValueError("has no host")
    if parts.netloc.startswith("["):
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has an invalid IPv6 literal") from None
        host = f"[{ip.compressed}]"
    path = _remove_dot_segments(_decode_unreserved(parts.path or "/"))
    return NormalisedURL(scheme, host.lower(), port if port is not None else _DEFAULT_PORTS[scheme], path)


def _under(path: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True)
class Endpoint:
    """One registered receiver. ``secret`` is never set here to a value read from the environment."""

    name: str
    url: str
    prefix: NormalisedURL
    secret: str | None = None  # inline secrets as written (space-separated while rotating)
    secret_env: str | None = None
    allow_http: bool = False
    allow_private_networks: bool = False
    max_in_flight: int | None = None
    breaker_threshold: int | None = None
    retry_delays_s: tuple[float, ...] | None = None
    timeout_s: float | None = None

    def __repr__(self) -> str:
        # dataclass's repr would print an inline secret.
        return f"Endpoint(name={self.name!r}, url={self.url!r})"

    def holds(self, url: NormalisedURL) -> bool:
        return (
            url.scheme == self.prefix.scheme
            and url.host == self.prefix.host
            and url.port == self.prefix.port
            and _under(url.path, self.prefix.path)
        )


@dataclass(frozen=True)
class Endpoints:
    endpoints: tuple[Endpoint, ...] = ()

    def __iter__(self) -> Any:
        return iter(self.endpoints)

    def __len__(self) -> int:
        return len(self.endpoints)

    def get(self, name: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.name == name), None)

    def match(self, url: str) -> Endpoint | None:
        """The endpoint whose url is the longest prefix of ``url``, or None."""
        try:
            target = normalise_url(url)
        except ValueError:
            return None
        best: Endpoint | None = None
        for endpoint in self.endpoints:
            if endpoint.holds(target) and (best is None or len(endpoint.prefix.path) > len(best.prefix.path)):
                best = endpoint
        return best


@dataclass(frozen=True)
class CallbackRules:
    """What a callback URL may do: the endpoint it belongs to, and the scheme and SSRF flags in force for it."""

    endpoint: Endpoint | None
    allow_http: bool
    allow_private: bool


def callback_rules(
    url: object, endpoints: Endpoints | None, *, allow_http: bool, allow_private: bool, endpoints_only: bool
) -> CallbackRules:
    """The rules for ``url``: an endpoint's own ``allow_http``/``allow_private_networks`` widen the
    pool's flags for its URLs only; raise UnregisteredEndpoint when only registered endpoints are
    allowed and ``url`` matches none."""
    endpoint = endpoints.match(url) if endpoints is not None and isinstance(url, str) else None
    if endpoint is None:
        if endpoints_only:
            raise UnregisteredEndpoint
        return CallbackRules(None, allow_http, allow_private)
    return CallbackRules(endpoint, allow_http or endpoint.allow_http, allow_private or endpoint.allow_private_networks)


def _bool(name: str, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise EndpointsFileError("must be true or false", endpoint=name, key=key)
    return value


def _positive_int(name: str, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise EndpointsFileError("must be a whole number from 1 to 1000000", endpoint=name, key=key)
    return value


def _seconds(name: str, key: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EndpointsFileError("must be a number of seconds", endpoint=name, key=key)
    seconds = float(value)
    low_ok = seconds >= 0 if allow_zero else seconds > 0
    if not (math.isfinite(seconds) and low_ok and seconds <= _MAX_SECONDS):
        bound = "0" if allow_zero else "more than 0"
        raise EndpointsFileError(f"must be from {bound} to {_MAX_SECONDS:.0f} seconds", endpoint=name, key=key)
    return seconds


def _delays(name: str, key: str, value: object) -> tuple[float, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= _MAX_DELAYS:
        raise EndpointsFileError(f"must be a list of 1 to {_MAX_DELAYS} delays in seconds", endpoint=name, key=key)
    return tuple(_seconds(name, key, v, allow_zero=True) for v in value)


def _text(name: str, key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EndpointsFileError("must be a non-empty string", endpoint=name, key=key)
    return value


def _endpoint(name: str, table: object) -> Endpoint:
    if not _NAME.fullmatch(name):
        raise EndpointsFileError("names are 1-64 letters, digits, '-' or '_'", endpoint=name)
    if not isinstance(table, dict):
        raise EndpointsFileError("must be a table ([endpoints.NAME])", endpoint=name)
    unknown = sorted(set(table) - KNOWN_KEYS)
    if unknown:
        raise EndpointsFileError(f"unknown key (known: {', '.join(sorted(KNOWN_KEYS))})", endpoint=name, key=unknown[0])
    if "url" not in table:
        raise EndpointsFileError("is required", endpoint=name, key="url")
    url = _text(name, "url", table["url"])
    try:
        prefix = normalise_url(url)
    except ValueError as exc:
        raise EndpointsFileError(f"must be an absolute http(s) URL ({exc})", endpoint=name, key="url") from None
    if urlsplit(url).query or "#" in url:
        raise EndpointsFileError("must not have a query or fragment", endpoint=name, key="url")
    has_secret, has_env = "secret" in table, "secret_env" in table
    if has_secret == has_env:
        raise EndpointsFileError("exactly one of 'secret' and 'secret_env' is required", endpoint=name, key="secret")
    secret = _text(name, "secret", table["secret"]) if has_secret else None
    secret_env = None
    if has_env:
        secret_env = _text(name, "secret_env", table["secret_env"])
        if not _ENV_NAME.fullmatch(secret_env):
            raise EndpointsFileError("must be an environment variable's name", endpoint=name, key="secret_env")
    allow_http = _bool(name, "allow_http", table.get("allow_http", False))
    if prefix.scheme == "http" and not allow_http:
        raise EndpointsFileError("is plain http: set allow_http = true for this endpoint", endpoint=name, key="url")

    def opt(key: str, parse: Any) -> Any:
        return parse(name, key, table[key]) if key in table else None

    return Endpoint(
        name=name,
        url=url,
        prefix=prefix,
        secret=secret,
        secret_env=secret_env,
        allow_http=allow_http,
        allow_private_networks=_bool(name, "allow_private_networks", table.get("allow_private_networks", False)),
        max_in_flight=opt("max_in_flight", _positive_int),
        breaker_threshold=opt("breaker_threshold", _positive_int),
        retry_delays_s=opt("retry_delays_s", _delays),
        timeout_s=opt("timeout_s", lambda n, k, v: _seconds(n, k, v, allow_zero=False)),
    )


def parse_endpoints(document: Mapping[str, Any]) -> Endpoints:
    """Endpoints from a parsed TOML document; EndpointsFileError naming the endpoint and key."""
    unknown = sorted(set(document) - {"endpoints"})
    if unknown:
        raise EndpointsFileError("unknown top-level key (only [endpoints.NAME] tables)", key=unknown[0])
    tables = document.get("endpoints", {})
    if not isinstance(tables, dict):
        raise EndpointsFileError("must be tables [endpoints.NAME]", key="endpoints")
    endpoints = tuple(_endpoint(name, table) for name, table in tables.items())
    _check_distinct(endpoints)
    return Endpoints(endpoints)


def _check_distinct(endpoints: Iterable[Endpoint]) -> None:
    seen: dict[str, str] = {}
    for endpoint in endpoints:
        key = str(endpoint.prefix)
        if key in seen:
            raise EndpointsFileError(f"has the same url as endpoint {seen[key]!r}", endpoint=endpoint.name, key="url")
        seen[key] = endpoint.name


def load_endpoints(path: str | os.PathLike[str]) -> Endpoints:
    """Read and check the endpoints file at ``path``."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise EndpointsFileError(f"cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise EndpointsFileError("is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message names a line and column, never a value.
        raise EndpointsFileError(f"is not valid TOML ({exc})") from None
    return parse_endpoints(document)
