"""Callback URL rules and the SSRF defence: literals, resolved addresses, pinning."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from check365_client.urls import MAX_URL_LENGTH, is_public_address, non_public_reason
from worker.delivery.urls import PinnedTarget, Resolver, pin_callback, system_resolver, validate_callback_url
from worker.errors import DeliveryFailed, InvalidWatchRequest, PermanentError, RetryableError, UnsafeCallbackURL

HOOK = "https://hooks.example.com/check365"

# (address, the class its refusal must name)
NON_PUBLIC = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "unique local"),
    ("fd12:3456::1", "unique local"),
    ("169.254.169.254", "link-local"),
    ("169.254.0.1", "link-local"),
    ("fe80::1", "link-local"),
    ("100.64.0.1", "CGNAT"),
    ("100.127.255.254", "CGNAT"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("0.1.2.3", "this network"),
    ("255.255.255.255", "broadcast"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("2001:db8::1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.0.9", "IETF"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped private"),
    ("::ffff:169.254.169.254", "IPv4-mapped link-local"),
    ("::7f00:1", "IPv4-compatible"),
    ("64:ff9b::7f00:1", "NAT64 loopback"),
    ("64:ff9b::a00:1", "NAT64 private"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("2002:7f00:1::", "6to4 loopback"),
    ("2002:a9fe:a9fe::1", "6to4 link-local"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("fec0::1", "site-local"),
    ("100::1", "discard"),
    ("4000::1", "reserved"),
]
NON_PUBLIC_IDS = [f"{addr}-{name}" for addr, name in NON_PUBLIC]

PUBLIC = [
    "93.184.216.34",
    "8.8.8.8",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:93.184.216.34",
    "64:ff9b::5db8:d822",  # NAT64 of 93.184.216.34
    "2002:5db8:d822::1",  # 6to4 of 93.184.216.34
]


def literal_url(address: str, scheme: str = "https") -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}/hook?a=1"


def answer(*addresses: str) -> Resolver:
    def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"an IP literal must not be resolved (asked for {host})")


# --- address classes ---------------------------------------------------------------


@pytest.mark.parametrize(("address", "name"), NON_PUBLIC, ids=NON_PUBLIC_IDS)
def test_non_public_address_is_named(address: str, name: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not is_public_address(ip)
    assert name in (non_public_reason(ip) or "")


@pytest.mark.parametrize("address", PUBLIC)
def test_public_address_is_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


def test_scoped_ipv6_is_not_public() -> None:
    assert not is_public_address(ipaddress.IPv6Address("2606:4700::1111%eth0"))


@given(st.ip_addresses())
def test_never_more_permissive_than_the_standard_library(ip: Any) -> None:
    embeds_v4 = ip.version == 6 and (ip.ipv4_mapped or ip.sixtofour or ip in ipaddress.IPv6Network("64:ff9b::/96"))
    if is_public_address(ip) and not embeds_v4:
        assert ip.is_global


@given(st.ip_addresses(v=4))
def test_embedded_ipv4_is_judged_like_the_ipv4_address(ip: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(ip))
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80) | 1)
    expected = is_public_address(ip)
    assert is_public_address(mapped) == expected
    assert is_public_address(nat64) == expected
    assert is_public_address(sixtofour) == expected


# --- literals at validate, resolved addresses at pin --------------------------------


@pytest.mark.parametrize(("address", "name"), NON_PUBLIC, ids=NON_PUBLIC_IDS)
def test_non_public_literal_is_refused_at_validate(address: str, name: str) -> None:
    url = literal_url(address)
    with pytest.raises(UnsafeCallbackURL, match="not a public address") as info:
        validate_callback_url(url, allow_http=False, allow_private=False)
    assert name in str(info.value)
    with pytest.raises(UnsafeCallbackURL):
        pin_callback(url, allow_http=False, allow_private=False, resolver=no_dns)


@pytest.mark.parametrize(("address", "name"), NON_PUBLIC, ids=NON_PUBLIC_IDS)
def test_non_public_resolved_address_is_refused_at_pin(address: str, name: str) -> None:
    assert validate_callback_url(HOOK, allow_http=False, allow_private=False) == HOOK
    with pytest.raises(UnsafeCallbackURL, match="resolves to") as info:
        pin_callback(HOOK, allow_http=False, allow_private=False, resolver=answer(address))
    assert name in str(info.value)
    assert info.value.reason == "unsafe_callback_url"


@pytest.mark.parametrize(("address", "name"), NON_PUBLIC, ids=NON_PUBLIC_IDS)
def test_allow_private_lifts_the_address_rules(address: str, name: str) -> None:
    url = literal_url(address)
    assert validate_callback_url(url, allow_http=False, allow_private=True) == url
    literal = pin_callback(url, allow_http=False, allow_private=True, resolver=no_dns)
    resolved = pin_callback(HOOK, allow_http=False, allow_private=True, resolver=answer(address))
    expected = str(ipaddress.ip_address(address))
    assert literal.address == resolved.address == expected


@pytest.mark.parametrize("address", PUBLIC)
def test_public_address_passes_as_literal_and_resolved(address: str) -> None:
    url = literal_url(address)
    assert validate_callback_url(url, allow_http=False, allow_private=False) == url
    assert pin_callback(url, allow_http=False, allow_private=False, resolver=no_dns).address == str(
        ipaddress.ip_address(address)
    )
    target = pin_callback(HOOK, allow_http=False, allow_private=False, resolver=answer(address))
    assert target.address == str(ipaddress.ip_address(address))


def test_any_non_public_answer_refuses_the_host() -> None:
    for answers in (["93.184.216.34", "10.0.0.1"], ["10.0.0.1", "93.184.216.34"]):
        with pytest.raises(UnsafeCallbackURL, match=r"10\.0\.0\.1"):
            pin_callback(HOOK, allow_http=False, allow_private=False, resolver=answer(*answers))


def test_pinned_url_carries_the_checked_address_despite_rebinding() -> None:
    calls: list[tuple[str, int]] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return ["93.184.216.34"] if len(calls) == 1 else ["127.0.0.1"]

    target = pin_callback(HOOK, allow_http=False, allow_private=False, resolver=rebinding)
    assert calls == [("hooks.example.com", 443)]
    assert target == PinnedTarget(
        url="https://93.184.216.34/check365",
        host_header="hooks.example.com",
        sni_hostname="hooks.example.com",
        address="93.184.216.34",
    )

    # The name now points at loopback: a later check refuses it, and the request built
    # from the earlier check still goes to the checked address.
    with pytest.raises(UnsafeCallbackURL, match="loopback"):
        pin_callback(HOOK, allow_http=False, allow_private=False, resolver=rebinding)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        client.post(
            target.url,
            content=b"{}",
            headers={"Host": target.host_header},
            extensions={"sni_hostname": target.sni_hostname},
        )
    (request,) = seen
    assert request.url.host == "93.184.216.34"
    assert request.headers["host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"


# --- pinned target shape --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "answers", "expected"),
    [
        (
            "https://Hooks.Example.com:8443/a/b%20c?x=1&y=%2F",
            ["2606:4700::1111"],
            PinnedTarget(
                url="https://[2606:4700::1111]:8443/a/b%20c?x=1&y=%2F",
                host_header="hooks.example.com:8443",
                sni_hostname="hooks.example.com",
                address="2606:4700::1111",
            ),
        ),
        (
            "https://hooks.example.com:443?only=query",
            ["93.184.216.34"],
            PinnedTarget(
                url="https://93.184.216.34?only=query",
                host_header="hooks.example.com",
                sni_hostname="hooks.example.com",
                address="93.184.216.34",
            ),
        ),
        (
            "http://hooks.example.com./in",
            ["93.184.216.34", "2606:4700::1111"],
            PinnedTarget(
                url="http://93.184.216.34/in",
                host_header="hooks.example.com.",
                sni_hostname=None,
                address="93.184.216.34",
            ),
        ),
    ],
)
def test_pinned_target_fields(url: str, answers: list[str], expected: PinnedTarget) -> None:
    assert pin_callback(url, allow_http=True, allow_private=False, resolver=answer(*answers)) == expected


def test_ip_literal_is_pinned_without_dns_or_sni() -> None:
    target = pin_callback("https://[2606:4700::1111]:8443/h", allow_http=False, allow_private=False, resolver=no_dns)
    assert target == PinnedTarget(
        url="https://[2606:4700::1111]:8443/h",
        host_header="[2606:4700::1111]:8443",
        sni_hostname=None,
        address="2606:4700::1111",
    )


@pytest.mark.parametrize(
    ("url", "port"), [(HOOK, 443), ("http://h.example.com/x", 80), ("https://h.example.com:8443/", 8443)]
)
def test_resolver_is_asked_for_the_effective_port(url: str, port: int) -> None:
    asked: list[int] = []

    def resolve(host: str, p: int) -> list[str]:
        asked.append(p)
        return ["93.184.216.34"]

    pin_callback(url, allow_http=True, allow_private=False, resolver=resolve)
    assert asked == [port]


def test_unresolvable_host_is_retryable() -> None:
    def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for resolver in (failing, answer()):
        with pytest.raises(DeliveryFailed, match="could not resolve callback host") as info:
            pin_callback(HOOK, allow_http=False, allow_private=False, resolver=resolver)
        assert isinstance(info.value, RetryableError)


def test_an_answer_that_is_not_an_address_is_refused() -> None:
    with pytest.raises(UnsafeCallbackURL, match="not an IP address"):
        pin_callback(HOOK, allow_http=False, allow_private=True, resolver=answer("localhost"))


def test_scoped_answers_are_skipped_as_connect_targets() -> None:
    target = pin_callback(HOOK, allow_http=False, allow_private=True, resolver=answer("fe80::1%eth0", "10.0.0.5"))
    assert target.address == "10.0.0.5"
    with pytest.raises(UnsafeCallbackURL, match="scoped"):
        pin_callback(HOOK, allow_http=False, allow_private=True, resolver=answer("fe80::1%eth0"))


def test_system_resolver_returns_address_strings() -> None:
    # A numeric host needs no name service, so this runs offline.
    assert system_resolver("127.0.0.1", 80) == ["127.0.0.1"]


# --- syntax and policy -----------------------------------------------------------------


def test_http_needs_allow_http() -> None:
    url = "http://hooks.example.com/check365"
    with pytest.raises(UnsafeCallbackURL, match="must use https") as info:
        validate_callback_url(url, allow_http=False, allow_private=False)
    assert "WEBHOOK_ALLOW_HTTP" in str(info.value)
    assert validate_callback_url(url, allow_http=True, allow_private=False) == url


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("https://user:pass@hooks.example.com/", "user:password@"),
        ("https://user@hooks.example.com/", "user:password@"),
        ("http://hooks.example.com:80@evil.example/", "user:password@"),
        ("https://hooks.example.com/check365#frag", "fragment"),
        ("https://hooks.example.com/#", "fragment"),
        ("/check365", "absolute"),
        ("hooks.example.com/check365", "absolute"),
        ("//hooks.example.com/check365", "absolute"),
        ("", "absolute"),
        ("https://", "absolute"),
        ("https:///check365", "absolute"),
        ("https:hooks.example.com", "absolute"),
        ("ftp://hooks.example.com/", "absolute"),
        ("javascript:alert(1)", "absolute"),
        ("file:///etc/passwd", "absolute"),
        ("https://hooks.example.com /x", "whitespace"),
        ("https://hooks.example.com/x\n", "whitespace"),
        ("https://hooks.example.com/\tx", "whitespace"),
        ("https://hooks.example.com/\x00", "control"),
        ("https://hooks.example.com/\u200bx", "control"),
        ("https://hooks.example.com:0/", "port"),
        ("https://hooks.example.com:65536/", "port"),
        ("https://hooks.example.com:-1/", "port"),
        ("https://hooks.example.com:+443/", "port"),
        ("https://hooks.example.com:http/", "port"),
        ("https://hooks.example.com:/", "port"),
        ("https://hooks.example.com:\u0664\u0664\u0663/", "port"),
        ("https://[::1/", "URL"),
        ("https://[not-v6]/", "IPv6|not a valid URL"),
        ("https://[127.0.0.1]/", "IPv6|not a valid URL"),
        ("https://[fe80::1%25eth0]/", "zone"),
        ("https://[2606:4700::1111]x/", "after"),
        ("https://2606:4700::1111/", "brackets"),
        ("https://hooks..example.com/", "valid host name"),
        ("https://-hooks.example.com/", "valid host name"),
        ("https://hooks.example.com%2F/", "valid host name"),
        ("https://hooks!.example.com/", "valid host name"),
        ("https://" + "a" * 64 + ".example.com/", "valid host name"),
        ("https://bücher.example/", "ASCII"),
        ("https://\uff11\uff12\uff17.0.0.1/", "ASCII"),
        ("https://2130706433/", "non-canonical"),
        ("https://017700000001/", "non-canonical"),
        ("https://0177.0.0.1/", "non-canonical"),
        ("https://0x7f.1/", "non-canonical"),
        ("https://0x7f000001/", "non-canonical"),
        ("https://127.1/", "non-canonical"),
        ("https://1.2.3.04/", "non-canonical"),
        ("https://93.184.216.34.0/", "non-canonical"),
        ("https://hooks.example.com/" + "a" * MAX_URL_LENGTH, "at most 2048"),
    ],
)
def test_malformed_url_is_refused(url: str, rule: str) -> None:
    for allow_private in (False, True):
        with pytest.raises(UnsafeCallbackURL, match=rule) as info:
            validate_callback_url(url, allow_http=True, allow_private=allow_private)
        assert str(info.value).startswith("callback_url: ")


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost/hook",
        "https://LOCALHOST./hook",
        "https://api.localhost/hook",
        "https://printer.local/hook",
        "https://db.internal:8443/hook",
        "https://router.home.arpa/hook",
        "https://intranet/hook",
    ],
)
def test_local_names_need_allow_private(url: str) -> None:
    with pytest.raises(UnsafeCallbackURL, match=r"local name|fully qualified"):
        validate_callback_url(url, allow_http=False, allow_private=False)
    assert validate_callback_url(url, allow_http=False, allow_private=True) == url


@pytest.mark.parametrize("value", [None, 42, 3.5, b"https://hooks.example.com/", [HOOK], {"url": HOOK}])
def test_non_string_is_refused(value: object) -> None:
    with pytest.raises(UnsafeCallbackURL, match="must be a string"):
        validate_callback_url(value, allow_http=False, allow_private=False)


@pytest.mark.parametrize(
    "url",
    [
        HOOK,
        "HTTPS://Hooks.Example.COM:8443/a/b;c?x=1&y=%20z&z=caf\u00e9",
        "https://hooks.example.com",
        "https://xn--bcher-kva.example/hook",
        "https://_acme.hooks.example.com/x",
        "https://hooks.example.com/" + "a" * (MAX_URL_LENGTH - len("https://hooks.example.com/")),
    ],
)
def test_valid_url_is_returned_unchanged(url: str) -> None:
    assert validate_callback_url(url, allow_http=False, allow_private=False) == url


def test_refusal_is_both_permanent_and_an_invalid_request() -> None:
    with pytest.raises(UnsafeCallbackURL) as info:
        validate_callback_url("http://x", allow_http=False, allow_private=False)
    assert isinstance(info.value, PermanentError)
    assert isinstance(info.value, InvalidWatchRequest)
    assert info.value.field == "callback_url"


# --- properties --------------------------------------------------------------------------

hosts = st.one_of(
    st.sampled_from(
        [
            "hooks.example.com",
            "HOOKS.example.com.",
            "localhost",
            "a.internal",
            "127.0.0.1",
            "[::1]",
            "[2606:4700::1111]",
            "93.184.216.34",
            "0x7f.1",
            "2130706433",
            "[fe80::1%25x]",
            "[v1.x]",
            "",
        ]
    ),
    st.text(alphabet="abz019.-_:[]%@x", max_size=24),
    st.ip_addresses().map(lambda ip: f"[{ip}]" if ip.version == 6 else str(ip)),
)
ports = st.one_of(
    st.just(""),
    st.integers(min_value=-5, max_value=70000).map(lambda p: f":{p}"),
    st.text(max_size=6).map(lambda t: ":" + t),
)
urlish = st.builds(
    lambda scheme, userinfo, host, port, rest: f"{scheme}{userinfo}{host}{port}{rest}",
    st.sampled_from(["https://", "http://", "HTTPS://", "ftp://", "", "https:/", "https:"]),
    st.sampled_from(["", "", "", "u:p@", "@"]),
    hosts,
    ports,
    st.one_of(st.just(""), st.text(max_size=30).map(lambda t: "/" + t), st.text(max_size=30)),
)
anything = st.one_of(
    urlish,
    st.text(),
    st.binary(),
    st.none(),
    st.integers(),
    st.floats(),
    st.lists(st.text(), max_size=3),
    st.dictionaries(st.text(), st.text(), max_size=3),
)


@given(value=anything, allow_http=st.booleans(), allow_private=st.booleans())
def test_validate_raises_nothing_but_unsafe_callback_url(value: object, allow_http: bool, allow_private: bool) -> None:
    try:
        result = validate_callback_url(value, allow_http=allow_http, allow_private=allow_private)
    except UnsafeCallbackURL:
        return
    assert result == value
    parsed = httpx.URL(result)
    assert parsed.scheme in ({"https", "http"} if allow_http else {"https"})
    if not allow_private:
        try:
            ip = ipaddress.ip_address(parsed.host.removesuffix("."))
        except ValueError:
            return
        assert is_public_address(ip)


@given(
    url=urlish,
    answers=st.lists(st.ip_addresses().map(str), min_size=1, max_size=4),
    allow_private=st.booleans(),
)
def test_pin_connects_only_to_checked_addresses(url: str, answers: list[str], allow_private: bool) -> None:
    try:
        target = pin_callback(url, allow_http=True, allow_private=allow_private, resolver=answer(*answers))
    except UnsafeCallbackURL:
        return
    original, pinned = httpx.URL(url), httpx.URL(target.url)
    if not allow_private:
        assert is_public_address(ipaddress.ip_address(target.address))
        literal = original.host.removesuffix(".")
        checked = [literal] if _is_ip(literal) else answers
        assert all(is_public_address(ipaddress.ip_address(a)) for a in checked)
    assert pinned.host == target.address
    assert (pinned.scheme, pinned.port, pinned.raw_path) == (original.scheme, original.port, original.raw_path)
    if target.sni_hostname is not None:
        assert target.sni_hostname == original.host.removesuffix(".")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --- real sockets ---------------------------------------------------------------------------


class _RecordingServer(ThreadingHTTPServer):
    hosts_seen: list[str]


class _RecordingHandler(BaseHTTPRequestHandler):
    server: _RecordingServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.server.hosts_seen.append(self.headers["Host"])
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[_RecordingServer]:
    server = _RecordingServer(("127.0.0.1", 0), _RecordingHandler)
    server.hosts_seen = []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def http_server() -> Iterator[_RecordingServer]:
    yield from _serve()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=rebind.test",
            "-addext",
            "subjectAltName=DNS:rebind.test",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def https_server(certificate: tuple[Path, Path]) -> Iterator[_RecordingServer]:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(*certificate)
    yield from _serve(tls)


def test_http_request_to_pinned_address_carries_the_original_host(http_server: _RecordingServer) -> None:
    port = http_server.server_address[1]
    target = pin_callback(
        f"http://rebind.test:{port}/hook", allow_http=True, allow_private=True, resolver=answer("127.0.0.1")
    )
    assert target.url == f"http://127.0.0.1:{port}/hook"
    with httpx.Client(trust_env=False) as client:
        response = client.post(
            target.url,
            content=b"{}",
            headers={"Host": target.host_header},
            extensions={"sni_hostname": target.sni_hostname},
        )
    assert response.status_code == 204
    assert http_server.hosts_seen == [f"rebind.test:{port}"]


def test_https_to_pinned_address_verifies_the_original_name(
    https_server: _RecordingServer, certificate: tuple[Path, Path]
) -> None:
    port = https_server.server_address[1]
    target = pin_callback(
        f"https://rebind.test:{port}/hook", allow_http=False, allow_private=True, resolver=answer("127.0.0.1")
    )
    trust = ssl.create_default_context(cafile=str(certificate[0]))
    with httpx.Client(verify=trust, trust_env=False) as client:
        response = client.post(
            target.url,
            content=b"{}",
            headers={"Host": target.host_header},
            extensions={"sni_hostname": target.sni_hostname},
        )
        assert response.status_code == 204
        assert https_server.hosts_seen == [f"rebind.test:{port}"]
    # Without the SNI extension TLS checks the certificate against 127.0.0.1 and fails:
    # the extension is what keeps verification on the original name.
    with httpx.Client(verify=trust, trust_env=False) as client, pytest.raises(httpx.ConnectError):
        client.post(target.url, content=b"{}", headers={"Host": target.host_header})


def test_a_url_parsed_before_is_judged_again_by_the_flags_of_each_call() -> None:
    # Parses are kept per URL: the flags are part of what is kept, and refusals are not kept.
    for _ in range(2):
        assert validate_callback_url("http://10.0.0.7/hook", allow_http=True, allow_private=True)
        with pytest.raises(UnsafeCallbackURL, match="https"):
            validate_callback_url("http://10.0.0.7/hook", allow_http=False, allow_private=True)
        with pytest.raises(UnsafeCallbackURL, match="not a public address"):
            validate_callback_url("http://10.0.0.7/hook", allow_http=True, allow_private=False)
    with pytest.raises(UnsafeCallbackURL, match="must be a string"):
        validate_callback_url(["http://10.0.0.7/hook"], allow_http=True, allow_private=True)
