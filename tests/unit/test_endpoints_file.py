"""The endpoints file: its rules, and which endpoint a callback URL belongs to."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from check365_client.endpoints import EndpointsFileError, load_endpoints, normalise_url, parse_endpoints

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def endpoints(**tables: dict[str, object]):
    return parse_endpoints({"endpoints": {name: {"secret": SECRET, **t} for name, t in tables.items()}})


def matched(registry, url: str) -> str | None:
    endpoint = registry.match(url)
    return None if endpoint is None else endpoint.name


# --- normalisation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("HTTPS://Hooks.Example.COM/Path", "https://hooks.example.com/Path"),
        ("https://hooks.example.com:443/a", "https://hooks.example.com/a"),
        ("http://hooks.example.com:80/a", "http://hooks.example.com/a"),
        ("https://hooks.example.com:8443/a", "https://hooks.example.com:8443/a"),
        ("https://hooks.example.com", "https://hooks.example.com/"),
        ("https://hooks.example.com./a", "https://hooks.example.com/a"),
        ("https://h.example.com/a/./b/../c", "https://h.example.com/a/c"),
        ("https://h.example.com/a/b/..", "https://h.example.com/a/"),
        ("https://h.example.com/../../a", "https://h.example.com/a"),
        ("https://h.example.com/%7euser/%41", "https://h.example.com/~user/A"),
        ("https://h.example.com/a%2fb", "https://h.example.com/a%2Fb"),
        ("https://h.example.com/%2e%2e/admin", "https://h.example.com/admin"),
        ("https://[2001:DB8:0:0::1]:443/x", "https://[2001:db8::1]/x"),
        ("https://[2001:db8::1]:8443/x", "https://[2001:db8::1]:8443/x"),
        ("https://h.example.com/a?b=1", "https://h.example.com/a"),
    ],
)
def test_normalise(url: str, expected: str) -> None:
    assert str(normalise_url(url)) == expected


@pytest.mark.parametrize(
    "url",
    ["ftp://h.example.com/", "https:///path", "https://user:pw@h.example.com/", "https://[zz::1]/", "/relative", ""],
)
def test_normalise_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        normalise_url(url)


# --- matching ----------------------------------------------------------------------------


REGISTRY = endpoints(
    root={"url": "https://hooks.example.com"},
    billing={"url": "https://hooks.example.com/billing"},
    billing_eu={"url": "https://hooks.example.com/billing/eu/"},
    v6={"url": "https://[2001:db8::1]/in"},
    port={"url": "https://hooks.example.com:8443/billing"},
)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://hooks.example.com/billing", "billing"),
        ("https://hooks.example.com/billing/", "billing"),
        ("https://hooks.example.com/billing/x?token=1", "billing"),
        ("https://HOOKS.example.com:443/billing/x", "billing"),
        ("https://hooks.example.com/billing/eu/", "billing_eu"),
        ("https://hooks.example.com/billing/eu/x", "billing_eu"),
        # The prefix /billing/eu/ ends with a slash: /billing/eu itself is not under it.
        ("https://hooks.example.com/billing/eu", "billing"),
        # Not on a / boundary: belongs to the host's root endpoint, never to billing.
        ("https://hooks.example.com/billing-evil", "root"),
        ("https://hooks.example.com/billingx/y", "root"),
        ("https://hooks.example.com/other", "root"),
        # Dot segments and escapes cannot climb out of or into a prefix.
        ("https://hooks.example.com/billing/../admin", "root"),
        ("https://hooks.example.com/other/../billing/x", "billing"),
        ("https://hooks.example.com/%62illing/x", "billing"),
        ("https://hooks.example.com/billing%2Fx", "root"),
        ("https://hooks.example.com:8443/billing/x", "port"),
        ("https://[2001:0db8::0001]/in/x", "v6"),
        ("http://hooks.example.com/billing", None),
        ("https://hooks.example.com:444/billing", None),
        ("https://other.example.com/billing", None),
        ("https://user@hooks.example.com/billing", None),
        ("not a url", None),
    ],
)
def test_match(url: str, name: str | None) -> None:
    assert matched(REGISTRY, url) == name


_segment = st.text(alphabet=string.ascii_letters + string.digits + "-_~.", min_size=1, max_size=8).filter(
    lambda s: s not in {".", ".."}
)
_paths = st.lists(_segment, max_size=4).map(lambda segments: "/" + "/".join(segments))


@given(prefix=_paths, rest=_paths, case=st.booleans(), port=st.booleans(), slash=st.booleans())
def test_a_url_under_a_prefix_matches_however_spelled(
    prefix: str, rest: str, case: bool, port: bool, slash: bool
) -> None:
    registry = endpoints(e={"url": "https://hooks.example.com" + prefix.rstrip("/") + ("/" if slash else "")})
    host = "HOOKS.Example.com" if case else "hooks.example.com"
    authority = host + (":443" if port else "")
    joined = prefix.rstrip("/") + "/" + rest.lstrip("/")
    assert matched(registry, f"https://{authority}{joined}") == "e"


@given(prefix=_paths.filter(lambda p: p != "/"), tail=_segment)
def test_a_longer_segment_is_never_under_a_prefix(prefix: str, tail: str) -> None:
    registry = endpoints(e={"url": "https://hooks.example.com" + prefix})
    assert matched(registry, "https://hooks.example.com" + prefix + tail) is None


@given(st.text(max_size=60))
def test_match_never_raises(url: str) -> None:
    REGISTRY.match(url)
    REGISTRY.match("https://hooks.example.com/" + url)


@given(a=_paths, b=_paths)
def test_the_longest_prefix_wins(a: str, b: str) -> None:
    if a.rstrip("/") == b.rstrip("/"):
        return
    registry = endpoints(a={"url": "https://h.example.com" + a}, b={"url": "https://h.example.com" + b})
    url = "https://h.example.com" + b.rstrip("/") + "/leaf"
    under_a = url.startswith("https://h.example.com" + a.rstrip("/") + "/")
    expected = "a" if under_a and len(a.rstrip("/")) > len(b.rstrip("/")) else "b"
    assert matched(registry, url) == expected


# --- the file's rules --------------------------------------------------------------------


A = '[endpoints.a]\nurl = "https://a.example.com"\nsecret = "x"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "endpoints.toml"
    path.write_text(text)
    return path


def test_the_contract_example_loads(tmp_path: Path) -> None:
    registry = load_endpoints(
        write(
            tmp_path,
            f"""
[endpoints.billing]
url = "https://billing.example.com/hooks/check365"
secret_env = "BILLING_WEBHOOK_SECRET"

[endpoints.crm]
url = "http://crm.internal:8080/check365"
secret = "{SECRET} {SECRET}"
allow_http = true
allow_private_networks = true
max_in_flight = 4
breaker_threshold = 10
retry_delays_s = [1, 2.5, 60]
timeout_s = 5
""",
        )
    )
    billing, crm = registry.get("billing"), registry.get("crm")
    assert billing is not None and crm is not None
    assert billing.secret_env == "BILLING_WEBHOOK_SECRET" and billing.secret is None
    assert not billing.allow_http and not billing.allow_private_networks and billing.max_in_flight is None
    assert crm.allow_http and crm.allow_private_networks
    assert (crm.max_in_flight, crm.breaker_threshold, crm.retry_delays_s, crm.timeout_s) == (4, 10, (1, 2.5, 60), 5)
    assert matched(registry, "http://CRM.internal:8080/check365/x") == "crm"
    assert SECRET not in repr(registry)


@pytest.mark.parametrize(
    ("text", "endpoint", "key"),
    [
        (A + 'secrt_env = "A"', "a", "secrt_env"),
        ('[endpoints.a]\nsecret = "x"', "a", "url"),
        ('[endpoints.a]\nurl = "https://a.example.com"', "a", "secret"),
        (A + 'secret_env = "A"', "a", "secret"),
        ('[endpoints.a]\nurl = "https://a.example.com"\nsecret_env = "not a name"', "a", "secret_env"),
        ('[endpoints.a]\nurl = "ftp://a.example.com"\nsecret = "x"', "a", "url"),
        ('[endpoints.a]\nurl = "https://a.example.com/?q=1"\nsecret = "x"', "a", "url"),
        ('[endpoints.a]\nurl = "http://a.example.com/"\nsecret = "x"', "a", "url"),
        (A + 'allow_http = "yes"', "a", "allow_http"),
        (A + "max_in_flight = 0", "a", "max_in_flight"),
        (
            A + "breaker_threshold = 1.5",
            "a",
            "breaker_threshold",
        ),
        (A + "retry_delays_s = []", "a", "retry_delays_s"),
        (A + "retry_delays_s = [-1]", "a", "retry_delays_s"),
        (A + "timeout_s = 0", "a", "timeout_s"),
        (A + "timeout_s = nan", "a", "timeout_s"),
        ('[endpoints."a b"]\nurl = "https://a.example.com"\nsecret = "x"', "a b", None),
        (
            A + '[endpoints.b]\nurl = "HTTPS://A.example.com:443/"\nsecret = "x"',
            "b",
            "url",
        ),
        ("[other]\nx = 1", None, "other"),
    ],
)
def test_a_bad_file_names_the_endpoint_and_key(
    tmp_path: Path, text: str, endpoint: str | None, key: str | None
) -> None:
    with pytest.raises(EndpointsFileError) as caught:
        load_endpoints(write(tmp_path, text))
    assert (caught.value.endpoint, caught.value.key) == (endpoint, key)
    if endpoint is not None:
        assert repr(endpoint) in str(caught.value)


def test_syntax_errors_and_missing_files_are_file_errors(tmp_path: Path) -> None:
    with pytest.raises(EndpointsFileError, match="not valid TOML"):
        load_endpoints(write(tmp_path, f'[endpoints.a\nsecret = "{SECRET}"'))
    with pytest.raises(EndpointsFileError, match="cannot be read"):
        load_endpoints(tmp_path / "missing.toml")


def test_an_error_never_shows_a_secret(tmp_path: Path) -> None:
    text = f'[endpoints.a]\nurl = "https://a.example.com"\nsecret = "{SECRET}"\nsecret_env = "A"\nallow_http = 3'
    with pytest.raises(EndpointsFileError) as caught:
        load_endpoints(write(tmp_path, text))
    assert SECRET not in str(caught.value)
    assert SECRET.removeprefix("whsec_") not in str(caught.value)
