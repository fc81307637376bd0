"""Callback URL rules and the SSRF defence.

Two stages, because DNS answers change:

- ``validate_callback_url`` applies every rule that needs no DNS (``check365_client.urls``,
  the one implementation the producers' client shares). It runs at enqueue time (bad input
  is refused before anything is queued) and again before each delivery.
- ``pin_callback`` resolves the host, refuses it if *any* address is not public, and
  returns the checked address to connect to. Sending the request to that address (with
  the original name in ``Host`` and in TLS SNI) means a DNS answer that changes between
  the check and the connection (DNS rebinding) cannot redirect the request.

Sending a pinned request with httpx::

    target = pin_callback(url, allow_http=..., allow_private=...)
    client.post(target.url, content=body, headers={**headers, "Host": target.host_header},
                extensions={"sni_hostname": target.sni_hostname})

The client must not use an environment proxy (``trust_env=False``), which would resolve
the name itself, and should not keep connections alive across different callback hosts:
httpx pools connections by address, so a connection opened (and TLS-verified) for one
host name could otherwise carry a request meant for another name on the same address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

from check365_client import errors as client_errors
from check365_client.urls import IPAddress, ParsedURL, non_public_reason, parse_callback_url
from worker.errors import DeliveryFailed, UnsafeCallbackURL

Resolver = Callable[[str, int], list[str]]


def _refuse(rule: str) -> UnsafeCallbackURL:
    return UnsafeCallbackURL(rule)


def _parse(url: object, *, allow_http: bool, allow_private: bool) -> ParsedURL:
    # One implementation of the rules, the client's; refused here, a URL is a permanent failure.
    try:
        return parse_callback_url(url, allow_http=allow_http, allow_private=allow_private)
    except client_errors.UnsafeCallbackURL as exc:
        raise UnsafeCallbackURL(exc.rule) from None


def validate_callback_url(url: object, *, allow_http: bool, allow_private: bool) -> str:
    """Return ``url`` unchanged if it passes every rule checkable without DNS.

    Raises UnsafeCallbackURL naming the broken rule, and nothing else, whatever ``url`` is.
    """
    return _parse(url, allow_http=allow_http, allow_private=allow_private).url


def system_resolver(host: str, port: int) -> list[str]:
    """The host's TCP addresses from the system resolver, without duplicates, in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: dict[str, None] = {}
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen[str(sockaddr[0])] = None
    return list(seen)


@dataclass(frozen=True)
class PinnedTarget:
    """Where to send one callback request, and how to present the original name."""

    url: str  # the callback URL with its host replaced by ``address``
    host_header: str  # the original host[:port], as the Host header would carry it
    sni_hostname: str | None  # the name TLS must verify; None for http or an IP literal
    address: str  # the checked address the request connects to


def _bracket(ip: IPAddress) -> str:
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _resolve(host: str, port: int, resolver: Resolver) -> list[IPAddress]:
    try:
        answers = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise DeliveryFailed(f"could not resolve callback host {host}") from exc
    if not answers:
        raise DeliveryFailed(f"could not resolve callback host {host}")
    addresses: list[IPAddress] = []
    for answer in answers:
        try:
            addresses.append(ipaddress.ip_address(answer))
        except ValueError:
            # Refuse what cannot be judged rather than guess.
            raise _refuse(f"host {host} resolved to something that is not an IP address") from None
    return addresses


def pin_callback(
    url: str, *, allow_http: bool, allow_private: bool, resolver: Resolver = system_resolver
) -> PinnedTarget:
    """Validate, resolve and check ``url``; return the checked address to connect to.

    Raises UnsafeCallbackURL if the URL breaks a rule or any resolved address is not public
    (unless ``allow_private``), DeliveryFailed (retryable) if the name does not resolve.
    """
    parsed = _parse(url, allow_http=allow_http, allow_private=allow_private)
    name = parsed.host.removesuffix(".")
    if parsed.ip is not None:
        addresses: list[IPAddress] = [parsed.ip]
    else:
        addresses = _resolve(parsed.host, parsed.effective_port, resolver)
    if not allow_private:
        for ip in addresses:
            reason = non_public_reason(ip)
            if reason is not None:
                raise _refuse(f"host {name} resolves to {ip}, not a public address ({reason})")
    # A zone id cannot be written into a URL httpx accepts; such addresses only
    # appear with allow_private (they are link-local), where another may be usable.
    usable = [ip for ip in addresses if not (isinstance(ip, ipaddress.IPv6Address) and ip.scope_id)]
    if not usable:
        raise _refuse(f"host {name} resolves only to scoped link-local addresses")
    address = usable[0]
    original_host = f"[{parsed.host}]" if parsed.ip is not None and parsed.ip.version == 6 else parsed.host
    return PinnedTarget(
        url=f"{parsed.scheme}://{parsed.authority(_bracket(address))}{parsed.rest}",
        host_header=parsed.authority(original_host),
        sni_hostname=name if parsed.scheme == "https" and parsed.ip is None else None,
        address=str(address),
    )


def endpoint_key(url: str) -> str:
    """The endpoint a callback URL belongs to: its scheme, host and port, normalised.

    Lower-case, the default port dropped (as in the endpoints file's matching), IPv6 in
    brackets, never a path or query (where a receiver might keep a token). Isolation
    (the per-endpoint cap and breaker) is keyed on it. A URL that does not parse gets
    a key of its own, ``invalid``: its events are dead-lettered at their first attempt.
    """
    try:
        parsed = _parse(url, allow_http=True, allow_private=True)
    except UnsafeCallbackURL:
        return "invalid"
    host = f"[{parsed.host}]" if parsed.ip is not None and parsed.ip.version == 6 else parsed.host.removesuffix(".")
    return f"{parsed.scheme}://{parsed.authority(host)}"
