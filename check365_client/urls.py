"""Callback URL rules that need no DNS, and the classes of addresses that never receive callbacks.

The worker applies the same rules again before each delivery, and then resolves the
host and checks every address (``worker.delivery.urls.pin_callback``), since DNS
answers change.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from check365_client.errors import UnsafeCallbackURL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Browsers and most servers cap URLs near 2 KiB; a longer callback URL is a mistake or abuse.
MAX_URL_LENGTH = 2048

_DEFAULT_PORTS = {"http": 80, "https": 443}

# Names that never leave the machine or the site: RFC 6761 (localhost), RFC 6762 (mDNS
# .local), the ICANN-reserved private TLD .internal, and RFC 8375 (home.arpa).
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa")

# DNS label: letters, digits, hyphen (not at either end) and underscore (seen in real names).
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
# A last label like this makes inet_aton and WHATWG URL parsers read the whole host as an
# IPv4 number ("2130706433", "0x7f.1", "0177.0.0.1", "127.1"), whatever it resolves to.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_MAX_HOSTNAME = 253


def _nets4(*cidrs: str) -> tuple[ipaddress.IPv4Network, ...]:
    return tuple(ipaddress.IPv4Network(c) for c in cidrs)


def _nets6(*cidrs: str) -> tuple[ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.IPv6Network(c) for c in cidrs)


# IANA special-purpose registries, listed explicitly because ``is_global`` differs between
# Python patch releases (3.11.7 calls multicast and 192.0.0.0/24 "global").
_V4_CLASSES: tuple[tuple[tuple[ipaddress.IPv4Network, ...], str], ...] = (
    (_nets4("0.0.0.0/32"), "unspecified"),
    (_nets4("255.255.255.255/32"), "broadcast"),
    (_nets4("0.0.0.0/8"), "'this network'"),
    (_nets4("127.0.0.0/8"), "loopback"),
    (_nets4("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"), "private"),
    (_nets4("100.64.0.0/10"), "shared (CGNAT)"),
    (_nets4("169.254.0.0/16"), "link-local"),
    (_nets4("192.0.0.0/24"), "IETF protocol assignment"),
    (_nets4("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"), "documentation"),
    (_nets4("198.18.0.0/15"), "benchmarking"),
    (_nets4("192.88.99.0/24"), "6to4 relay anycast"),
    (_nets4("224.0.0.0/4"), "multicast"),
    (_nets4("240.0.0.0/4"), "reserved"),
)

_V6_CLASSES: tuple[tuple[tuple[ipaddress.IPv6Network, ...], str], ...] = (
    (_nets6("::/128"), "unspecified"),
    (_nets6("::1/128"), "loopback"),
    (_nets6("::/96"), "IPv4-compatible (deprecated)"),
    (_nets6("::ffff:0:0:0/96"), "IPv4-translated"),
    (_nets6("64:ff9b:1::/48"), "local-use NAT64"),
    (_nets6("100::/64"), "discard-only"),
    (_nets6("2001::/32"), "Teredo"),
    (_nets6("2001:db8::/32", "3fff::/20"), "documentation"),
    (_nets6("2001:2::/48"), "benchmarking"),
    (_nets6("2001::/23"), "IETF protocol assignment"),
    (_nets6("fc00::/7"), "unique local (private)"),
    (_nets6("fe80::/10"), "link-local"),
    (_nets6("fec0::/10"), "site-local (deprecated)"),
    (_nets6("ff00::/8"), "multicast"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Everything outside global unicast is unassigned or special: allow-list it.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def non_public_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not receive callbacks (for example "loopback"), or None if it may."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_reason(ip)
    return _v6_reason(ip)


def _v4_reason(ip: ipaddress.IPv4Address) -> str | None:
    for networks, name in _V4_CLASSES:
        if any(ip in net for net in networks):
            return name
    return None if ip.is_global else "non-global"


def _v6_reason(ip: ipaddress.IPv6Address) -> str | None:
    if ip.scope_id:
        return "scoped (zone id)"
    # Addresses that embed an IPv4 address reach that address: judge it instead.
    embedded: tuple[str, ipaddress.IPv4Address] | None = None
    if ip.ipv4_mapped is not None:
        embedded = ("IPv4-mapped", ip.ipv4_mapped)
    elif ip in _NAT64:
        embedded = ("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    elif ip.sixtofour is not None:
        embedded = ("6to4", ip.sixtofour)
    if embedded is not None:
        inner = _v4_reason(embedded[1])
        return None if inner is None else f"{embedded[0]} {inner}"

    for networks6, name in _V6_CLASSES:
        if any(ip in net for net in networks6):
            return name
    if ip not in _GLOBAL_UNICAST:
        return "reserved"
    return None if ip.is_global else "non-global"


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (see ``non_public_reason``)."""
    return non_public_reason(ip) is None


@dataclass(frozen=True)
class ParsedURL:
    url: str
    scheme: str
    host: str  # lower-case, without IPv6 brackets, trailing dot kept
    ip: IPAddress | None  # set when the host is an IP literal
    port: int | None  # only when given explicitly and not the scheme's default
    rest: str  # path, query: everything after the authority, byte for byte

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else _DEFAULT_PORTS[self.scheme]

    def authority(self, host: str) -> str:
        return host + (f":{self.port}" if self.port is not None else "")


def _refuse(rule: str) -> UnsafeCallbackURL:
    return UnsafeCallbackURL(rule)


def _parse_port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535):
        raise _refuse("port must be a number from 1 to 65535")
    return int(text)


def _split_authority(netloc: str) -> tuple[str, bool, int | None]:
    """(host, bracketed, explicit port) of an authority without userinfo."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise _refuse("has an unclosed '[' in the host")
        host, rest, bracketed = netloc[1:end], netloc[end + 1 :], True
    else:
        if "[" in netloc or "]" in netloc:
            raise _refuse("has a misplaced '[' or ']' in the host")
        if netloc.count(":") > 1:
            raise _refuse("IPv6 addresses must be written in brackets")
        host, sep, port_text = netloc.partition(":")
        rest, bracketed = (":" + port_text if sep else ""), False
    if rest and not rest.startswith(":"):
        raise _refuse("has text after the ']' of the host")
    return host, bracketed, _parse_port(rest[1:]) if rest else None


def _check_ipv6_literal(host: str) -> ipaddress.IPv6Address:
    if "%" in host:
        raise _refuse("IPv6 zone identifiers are not allowed")
    try:
        return ipaddress.IPv6Address(host)
    except ValueError:
        raise _refuse("has an invalid IPv6 address in brackets") from None


def _check_name(host: str, *, allow_private: bool) -> ipaddress.IPv4Address | None:
    """Check a host that is not bracketed; return its address if it is an IPv4 literal."""
    if not host:
        raise _refuse("must have a host")
    if not host.isascii():
        raise _refuse("host must be ASCII (write international names in xn-- punycode form)")
    # One trailing dot makes a name fully qualified; it designates the same host.
    name = host.removesuffix(".")
    try:
        return ipaddress.IPv4Address(name)
    except ValueError:
        pass
    labels = name.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise _refuse("host is an IP address in a non-canonical form; write it as a.b.c.d")
    if len(name) > _MAX_HOSTNAME or not all(_LABEL.fullmatch(label) for label in labels):
        raise _refuse("host is not a valid host name")
    if not allow_private:
        if name == "localhost" or name.endswith(_LOCAL_SUFFIXES):
            raise _refuse(f"host {name} is a local name")
        if len(labels) == 1:
            # Single-label names resolve through local search domains to internal hosts.
            raise _refuse(f"host {name} is not a fully qualified domain name")
    return None


# A pool's callback URLs are few, and each job's is parsed at its start, at each poll and
# at each delivery: the answers for the most recent URLs are kept (refusals are not).
PARSED_URLS_KEPT = 1024


def parse_callback_url(url: object, *, allow_http: bool, allow_private: bool) -> ParsedURL:
    if not isinstance(url, str):
        raise _refuse("must be a string")
    return _parse_text(str(url), allow_http, allow_private)


@functools.lru_cache(maxsize=PARSED_URLS_KEPT)
def _parse_text(url: str, allow_http: bool, allow_private: bool) -> ParsedURL:
    if len(url) > MAX_URL_LENGTH:
        raise _refuse(f"must be at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise _refuse("must not contain whitespace or control characters")
    if "#" in url:
        raise _refuse("must not contain a fragment (#...)")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _refuse("is not a valid URL") from None
    scheme = parts.scheme
    prefix = f"{scheme}://{parts.netloc}"
    if scheme not in _DEFAULT_PORTS or not parts.netloc or url[: len(prefix)].lower() != prefix.lower():
        raise _refuse("must be an absolute https URL (https://host/path)")
    if scheme == "http" and not allow_http:
        raise _refuse("must use https (plain http needs WEBHOOK_ALLOW_HTTP=true)")
    if "@" in parts.netloc:
        raise _refuse("must not contain user:password@")

    host, bracketed, port = _split_authority(parts.netloc)
    host = host.lower()
    ip: IPAddress | None = _check_ipv6_literal(host) if bracketed else _check_name(host, allow_private=allow_private)
    if ip is not None and not allow_private:
        reason = non_public_reason(ip)
        if reason is not None:
            raise _refuse(f"host {ip} is not a public address ({reason})")
    if port == _DEFAULT_PORTS[scheme]:
        port = None
    return ParsedURL(url=url, scheme=scheme, host=host, ip=ip, port=port, rest=url[len(prefix) :])


def validate_callback_url(url: object, *, allow_http: bool, allow_private: bool) -> str:
    """Return ``url`` unchanged if it passes every rule checkable without DNS.

    Raises UnsafeCallbackURL naming the broken rule, and nothing else, whatever ``url`` is.
    """
    return parse_callback_url(url, allow_http=allow_http, allow_private=allow_private).url
