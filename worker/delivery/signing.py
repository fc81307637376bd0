"""Standard Webhooks v1 signing and verification.

The signed content is ``"{webhook-id}.{webhook-timestamp}."`` followed by the body
*bytes exactly as sent*: re-serialising JSON between signing and sending (or between
receiving and verifying) changes the bytes and breaks the signature.

Implemented with the standard library only, so that the worker does not depend on
the reference library it is tested against.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence

from worker.errors import InvalidSignature

SECRET_PREFIX = "whsec_"  # noqa: S105  the format's prefix, not a secret
SIGNATURE_VERSION = "v1"

# 32 base32 characters carry 160 bits of the digest: collisions between distinct
# events are out of reach, and the id stays short enough to read in logs.
_WEBHOOK_ID_CHARS = 32
# Unix seconds have 10 digits until the year 2286; a longer value is refused before
# int() parses it (Python refuses to parse past 4,300 digits with a ValueError).
_MAX_TIMESTAMP_DIGITS = 12


def decode_secret(secret: str) -> bytes:
    """Return the HMAC key inside ``whsec_<base64>``.

    Raises ValueError whose message never contains the secret, so callers may log it.
    """
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret must look like whsec_<base64 key>")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part of a webhook secret after whsec_ must be valid base64") from None
    if not key:
        raise ValueError("a webhook secret must not have an empty key")
    return key


def fingerprint(secret: str) -> str:
    """A short public name of a secret, to tell which one is configured where without showing it.

    The first 64 bits of the key's SHA-256: a key of at least 128 random bits cannot be
    recovered from it, and two secrets are told apart.
    """
    return "sha256:" + hashlib.sha256(decode_secret(secret)).hexdigest()[:16]


def _signed_content(msg_id: str, timestamp: int | str, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def _digest(key: bytes, content: bytes) -> bytes:
    return hmac.new(key, content, hashlib.sha256).digest()


def _keys(secrets: Sequence[str]) -> list[bytes]:
    # A bare string is a Sequence[str] too; iterating it would sign with each
    # character, so it is refused rather than silently misread.
    if isinstance(secrets, str):
        raise TypeError("secrets must be a sequence of whsec_ strings, not one string")
    if not secrets:
        raise ValueError("at least one webhook secret is required")
    return [decode_secret(s) for s in secrets]


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` entry per secret, space-separated."""
    content = _signed_content(msg_id, timestamp, body)
    return " ".join(
        f"{SIGNATURE_VERSION},{base64.b64encode(_digest(key, content)).decode('ascii')}" for key in _keys(secrets)
    )


def _check_header_value(name: str, value: str) -> None:
    # A CR or LF in a header value would let it inject further headers.
    if not (value and value.isascii() and value.isprintable()):
        raise ValueError(f"{name} must be non-empty printable ASCII")


def webhook_headers(
    secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes, user_agent: str
) -> dict[str, str]:
    """Every header of one delivery attempt; ``body`` must be the bytes that are sent."""
    _check_header_value("webhook-id", msg_id)
    if " " in msg_id:  # the one whitespace printable ASCII has
        raise ValueError("webhook-id must not contain whitespace")
    _check_header_value("user-agent", user_agent)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, msg_id, timestamp, body),
        "user-agent": user_agent,
    }


def new_webhook_id(*parts: str) -> str:
    """A deterministic ``msg_...`` id, so that creating the same event twice yields one id.

    Parts are length-prefixed before hashing, so ("ab", "c") and ("a", "bc") differ.
    """
    if not parts:
        raise ValueError("new_webhook_id needs at least one part")
    hasher = hashlib.sha256()
    for part in parts:
        encoded = part.encode("utf-8", "surrogatepass")
        hasher.update(f"{len(encoded)}:".encode())
        hasher.update(encoded)
    # Base32 turns each 5 bytes into 8 characters: the id's characters are those of the
    # digest's first bytes alone, which spares encoding the rest (the same ids as before).
    token = base64.b32encode(hasher.digest()[: _WEBHOOK_ID_CHARS * 5 // 8]).decode("ascii").lower()
    return "msg_" + token


def _decode_entry(entry: str) -> bytes | None:
    version, sep, encoded = entry.partition(",")
    if not sep or version != SIGNATURE_VERSION:
        return None
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance_s: float = 300,
) -> None:
    """Check a received webhook; raise InvalidSignature saying why it is refused.

    Accepts when any ``v1`` entry of ``webhook-signature`` matches any of ``secrets``,
    so a receiver in the middle of a key rotation can pass both keys.
    """
    keys = _keys(secrets)
    lowered = {k.lower(): v for k, v in headers.items()}
    values: dict[str, str] = {}
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        value = lowered.get(name, "").strip()
        if not value:
            raise InvalidSignature(f"missing header {name}")
        values[name] = value

    raw_ts = values["webhook-timestamp"]
    if not (raw_ts.isascii() and raw_ts.isdigit()):
        raise InvalidSignature("webhook-timestamp is not a whole number of unix seconds")
    if len(raw_ts) > _MAX_TIMESTAMP_DIGITS:
        raise InvalidSignature(f"webhook-timestamp has more than {_MAX_TIMESTAMP_DIGITS} digits")
    timestamp = int(raw_ts)
    if timestamp < now - tolerance_s:
        raise InvalidSignature(f"webhook-timestamp is too old: {now - timestamp:.0f}s ago, tolerance {tolerance_s:g}s")
    if timestamp > now + tolerance_s:
        raise InvalidSignature(
            f"webhook-timestamp is too new: {timestamp - now:.0f}s ahead, tolerance {tolerance_s:g}s"
        )

    received = [d for d in map(_decode_entry, values["webhook-signature"].split()) if d is not None]
    if not received:
        raise InvalidSignature("webhook-signature has no well-formed v1,<base64> entry")
    # The digits as received, not re-formatted: the sender signed exactly those.
    content = _signed_content(values["webhook-id"], raw_ts, body)
    for key in keys:
        expected = _digest(key, content)
        if any(hmac.compare_digest(expected, candidate) for candidate in received):
            return
    raise InvalidSignature("no v1 signature matches any secret (wrong secret, or the body, id or timestamp changed)")
