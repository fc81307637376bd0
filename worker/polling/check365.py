"""The Check365 bulk-status client and the classification of its answers.

``fetch_status`` asks once; ``classify_response`` (pure) turns one answer into a
``PollOutcome`` or raises one of the errors of :mod:`worker.errors`:

    answer                                        outcome
    2xx, success true, status completed, all in   Completed(data)
    2xx, success true, status completed, missing  Incomplete (re-poll; in time, deliver it)
    2xx, success true, failure-like status        Failed
    2xx, success true, any other status           Running
    2xx, success false, job unknown / key refused Check365Rejected
    429                                           Check365Throttled
    401 403 / 404 / other 4xx, Check365's refusal Check365Rejected (404: only "job not found")
    3xx; 4xx or 2xx that is not Check365's JSON   Check365Misconfigured
    408, 425, 5xx, a cut answer, success false    Check365Unavailable

Check365's refusal is its JSON envelope, ``{"success": false, "message": "..."}``.
Anything else on a 3xx or 4xx (a web server's HTML 404 for a base URL one path
segment off, a proxy's 401) did not come from Check365, and says nothing about the
job: it must never end a watch.

The API key travels in the query string, so no message built here contains the
request URL, and no error is chained to an httpx exception (which carries it).

Big answers. A completed job's answer carries every result, about 190 bytes each
and several times that once parsed into Python objects. An answer larger than
``IN_MEMORY_MAX_BYTES`` is never held whole: it is streamed into an unlinked
temporary file and read back in slices. The results array is cut at the item
boundaries (found by a regular expression, then confirmed), every slice is checked
by orjson a thousand results at a time, the rest of the answer is parsed by orjson
with the array left out, and ``Completed.data["results"]`` becomes a
``SpooledResults``: the offsets of the results in the file. Webhook parts are then
built from the results' own bytes, one part at a time. Every byte is still checked
by orjson, so a big answer is classified exactly as it would be whole, and its
results reach the receiver as Check365 wrote them.
"""

from __future__ import annotations

import functools
import math
import os
import re
import secrets as random_tokens
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from typing import IO, Any, Final, NoReturn, TypeGuard

import httpx
import orjson

from worker import __version__
from worker.errors import (
    Check365Misconfigured,
    Check365Rejected,
    Check365Throttled,
    Check365Unavailable,
    OutOfTime,
)
from worker.retry_after import parse_retry_after
from worker.runtime.deadlines import exchange_deadline
from worker.runtime.leases import head, status_budget_s, within
from worker.runtime.logs import Redactor
from worker.runtime.transport import ThreadShardedTransport, open_response
from worker.settings import Settings

__all__ = [
    "IN_MEMORY_MAX_BYTES",
    "MAX_ANSWER_BYTES",
    "MAX_STATUS_CHARS",
    "TERMINAL_FAILURE_STATUSES",
    "USER_AGENT",
    "Completed",
    "Failed",
    "Incomplete",
    "PollOutcome",
    "Running",
    "SpooledResults",
    "classify_response",
    "fetch_status",
    "make_client",
]

USER_AGENT: Final = f"check365-worker/{__version__}"

# Check365 documents only "completed"; these are the failure words its peers use.
TERMINAL_FAILURE_STATUSES: Final = frozenset(
    {"failed", "failure", "error", "errored", "canceled", "cancelled", "aborted", "expired", "rejected"}
)

# Enough of a Check365 message to diagnose, short enough to log on every poll.
MAX_MESSAGE_CHARS: Final = 200
# A job status is a word ("processing", "completed"); it is logged on every poll and
# copied into events, so a longer one is cut here.
MAX_STATUS_CHARS: Final = 100
# Connecting should never take long; a slow connect means the host is unwell.
_MAX_CONNECT_TIMEOUT_S: Final = 10.0

# Answers up to this size are parsed whole: every poll of a running job, and
# completed jobs of about a thousand results. Larger ones are spooled to a file and
# read in slices (module docstring).
IN_MEMORY_MAX_BYTES: Final = 256 * 1024
# About five million results: a larger answer is refused rather than allowed to
# fill the temporary directory (compressed, a gigabyte fits in a megabyte).
MAX_ANSWER_BYTES: Final = 1 << 30
# An answer not shaped like a completed one is parsed whole; legitimate ones are a
# few hundred bytes, and parsing takes several times the size in memory.
_WHOLE_READ_MAX_BYTES: Final = 128 << 20
# The body is received, and the spool read, in pieces of these sizes: few system
# calls, and little next to one webhook part.
_CHUNK_BYTES: Final = 64 * 1024
# An error answer matters for its message alone; an endless one must not fill memory.
_ERROR_BODY_MAX_BYTES: Final = 64 * 1024
_BLOCK_BYTES: Final = 1 << 20
# Results checked by one orjson call: about 200 KB, parsed and dropped at once.
_BATCH: Final = 1000
# The part of an answer before its results is a few hundred bytes; one this large
# is not worth slicing.
_MAX_PREFIX_BYTES: Final = 16 << 20

_REDACTED: Final = "[redacted]"

# A message that names the job is about the job even when it also names the key
# ("job not found for this API key"); otherwise key words win over a bare
# "not found" ("API key not found").
_JOB_MARKERS: Final = ("no such job", "unknown job")
_NOT_FOUND_MARKERS: Final = ("not found", "does not exist")
_KEY_MARKERS: Final = ("api key", "apikey", "api_key", "unauthori", "forbidden", "invalid key")


@dataclass(frozen=True)
class Running:
    status: str
    progress: float | None
    total: int | None


@dataclass(frozen=True)
class Incomplete:
    """Reported completed, but ``received`` results arrived out of ``total``.

    ``answer`` is the answer as it came, for a caller that has waited long enough
    for the rest (Check365's own example answer has fewer results than its total).
    It may hold a temporary file: call ``close`` when it is not used.
    """

    status: str
    progress: float | None
    total: int
    received: int
    answer: Completed | None = field(default=None, compare=False, repr=False)

    def close(self) -> None:
        if self.answer is not None:
            self.answer.close()


@dataclass(frozen=True)
class Completed:
    """Check365's ``data`` object as parsed: fields unchanged, unknown ones kept.

    For a big answer ``data["results"]`` is a ``SpooledResults``, which holds the
    answer's temporary file: call ``close`` once the results have been read.
    """

    data: dict[str, Any]

    def close(self) -> None:
        results = self.data.get("results")
        if isinstance(results, SpooledResults):
            results.close()


@dataclass(frozen=True)
class Failed:
    status: str
    message: str


PollOutcome = Running | Incomplete | Completed | Failed


def make_client(
    settings: Settings, transport: httpx.BaseTransport | None = None, *, max_connections: int = 20
) -> httpx.Client:
    """The one Check365 client of a process: reuse it, its pool keeps connections warm.

    ``max_connections`` is the number of steps that may wait on Check365 at once (the
    worker's threads): a smaller pool would make the rest queue for a connection.
    """
    t = settings.check365_timeout_s
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.Client(
        timeout=httpx.Timeout(connect=min(_MAX_CONNECT_TIMEOUT_S, t), read=t, write=t, pool=t),
        limits=limits,
        # A redirect would re-send the API key to wherever it points.
        follow_redirects=False,
        # Nor may HTTP(S)_PROXY, NETRC or SSL_CERT_* set for other programs send it (or
        # trust its TLS) elsewhere: the API is reached directly, as configured here.
        trust_env=False,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        transport=transport or ThreadShardedTransport(limits),
    )


def fetch_status(
    client: httpx.Client,
    settings: Settings,
    job_id: str,
    *,
    in_memory_max: int = IN_MEMORY_MAX_BYTES,
    max_answer: int = MAX_ANSWER_BYTES,
    whole_read_max: int = _WHOLE_READ_MAX_BYTES,
) -> PollOutcome:
    """Ask Check365 once about ``job_id``; see the module docstring for the outcomes.

    A 2xx answer larger than ``in_memory_max`` bytes is spooled to a temporary
    file and read back in slices; a ``Completed`` outcome of such an answer holds
    that file until it is closed. An answer larger than ``max_answer``, or one over
    ``whole_read_max`` that cannot be sliced, is a transient failure.
    """
    answer = _get(client, settings, job_id, in_memory_max, max_answer)
    # Raised outside the ``except`` blocks of ``_get`` so that the error has no
    # ``__context__`` either: the httpx exception holds the request URL.
    if isinstance(answer, str):
        raise Check365Unavailable(answer)
    status_code, headers, body = answer
    if isinstance(body, bytes):
        return classify_response(status_code, headers, body, job_id, redact=settings.redacted_values)
    return _classify_spool(body, job_id, settings.redacted_values, whole_read_max)


_Fetched = tuple[int, httpx.Headers, "bytes | _Spool"]


def _get(client: httpx.Client, settings: Settings, job_id: str, in_memory_max: int, max_answer: int) -> _Fetched | str:
    params = {"api_key": settings.api_key, "job_id": job_id}
    budget = status_budget_s(settings)
    try:
        with (
            exchange_deadline(budget) as deadline,
            closing(open_response(client, "GET", settings.status_url, params=params)) as response,
        ):
            chunks = within(response.iter_bytes(_CHUNK_BYTES), deadline)
            if not 200 <= response.status_code < 300:
                # Error answers are classified whole, and only their message matters.
                return response.status_code, response.headers, head(chunks, _ERROR_BODY_MAX_BYTES)
            body = _receive(chunks, in_memory_max, max_answer)
            return response.status_code, response.headers, body
    except OutOfTime:
        return f"Check365's answer took longer than {budget:g} s (twice CHECK365_TIMEOUT_S) to arrive"
    except httpx.TimeoutException as exc:
        return f"Check365 did not answer in time ({type(exc).__name__})"
    except httpx.RequestError as exc:
        # Never str(exc): httpx messages may quote the URL, key included.
        return f"could not reach Check365 ({type(exc).__name__})"
    except OSError as exc:
        return f"could not spool Check365's answer to a temporary file ({type(exc).__name__})"


def _receive(chunks: Iterable[bytes], in_memory_max: int, max_answer: int) -> bytes | _Spool:
    """The body: as bytes while it is small, else in a temporary file."""
    kept: list[bytes] = []
    size = 0
    spool: _Spool | None = None
    try:
        for chunk in chunks:
            size += len(chunk)
            if size > max_answer:
                raise Check365Unavailable(f"the answer is larger than {max_answer:,} bytes")
            if spool is not None:
                spool.write(chunk)
                continue
            kept.append(chunk)
            if size > in_memory_max:
                spool = _Spool()
                for piece in kept:
                    spool.write(piece)
                kept.clear()
    except BaseException:
        if spool is not None:
            spool.close()
        raise
    if spool is None:
        return b"".join(kept)
    spool.finish()
    return spool


def classify_response(
    status_code: int,
    headers: Mapping[str, str],
    body: bytes,
    job_id: str,
    *,
    redact: Iterable[str] = (),
) -> PollOutcome:
    """Turn one Check365 answer into an outcome, or raise the matching error.

    Every string in ``redact`` (the API key, in practice) is removed from any
    Check365 message quoted in an error or in ``Failed.message``.
    """
    secrets = tuple(s for s in redact if s)
    if not 200 <= status_code < 300:
        _raise_for_status(status_code, headers, body, secrets)
    return _classify_parsed(_loads(body), job_id, secrets, cut_object=_cut_object(body))


def _cut_object(start: bytes) -> bool:
    """Whether a body that orjson refused begins like a JSON object: an answer cut short.

    Only the first bytes are looked at. An empty body counts too (a dropped answer).
    """
    head = start[:64].lstrip(b" \t\n\r")
    return head[:1] in (b"", b"{")


def _classify_parsed(parsed: object, job_id: str, secrets: tuple[str, ...], *, cut_object: bool) -> PollOutcome:
    if parsed is _MALFORMED and cut_object:
        raise Check365Unavailable("malformed answer: the body is not a JSON object")
    if not isinstance(parsed, dict) or not isinstance(parsed.get("success"), bool):
        raise Check365Misconfigured(
            f"the answer is not Check365's JSON ({_what_it_is(parsed)}): check CHECK365_BASE_URL"
        )
    success = parsed["success"]
    message = _message_of(parsed, secrets)
    if not success:
        _raise_for_refusal(message)
    data = parsed.get("data")
    if not isinstance(data, dict):
        raise Check365Unavailable("malformed answer: success without a 'data' object")
    return _classify_data(data, job_id, message)


def _classify_data(data: dict[str, Any], job_id: str, message: str) -> PollOutcome:
    if "jobId" in data and data["jobId"] != job_id:
        raise Check365Unavailable("malformed answer: answer for another job")
    status = data.get("status")
    if not isinstance(status, str):
        raise Check365Unavailable("malformed answer: 'data.status' is not a string")
    if len(status) > MAX_STATUS_CHARS:
        status = status[:MAX_STATUS_CHARS]
        data["status"] = status
    normalized = status.strip().lower()
    if normalized == "completed":
        return _classify_completed(data, status)
    if normalized in TERMINAL_FAILURE_STATUSES:
        return Failed(status=status, message=message)
    total = data.get("total")
    return Running(
        status=status,
        progress=_progress(data.get("progress")),
        total=total if _is_count(total) else None,
    )


def _classify_completed(data: dict[str, Any], status: str) -> Completed | Incomplete:
    results = data.get("results")
    total = data.get("total")
    if isinstance(results, SpooledResults):
        received = len(results)  # objects only: checked while slicing
    elif isinstance(results, list) and all(isinstance(r, dict) for r in results):
        received = len(results)
    else:
        received = -1
    if received < 0:
        raise Check365Unavailable("malformed answer: 'data.results' is not a list of objects")
    if not _is_count(total):
        raise Check365Unavailable("malformed answer: 'data.total' is not a non-negative integer")
    if received == total:
        return Completed(data=data)
    return Incomplete(
        status=status,
        progress=_progress(data.get("progress")),
        total=total,
        received=received,
        answer=Completed(data=data),
    )


def _raise_for_status(status_code: int, headers: Mapping[str, str], body: bytes, secrets: tuple[str, ...]) -> NoReturn:
    detail = f"Check365 answered HTTP {status_code}"
    parsed = _loads(body)
    if isinstance(parsed, dict) and (quoted := _message_of(parsed, secrets)):
        detail = f"{detail}: {quoted}"
    if status_code == 429:
        raise Check365Throttled(detail, retry_after=_retry_after(headers))
    if status_code in (408, 425) or 500 <= status_code < 600:
        raise Check365Unavailable(detail, retry_after=_retry_after(headers))
    if 300 <= status_code < 400:
        # Check365 never redirects this endpoint: the base URL points somewhere else.
        raise Check365Misconfigured(f"unexpected redirect: {detail}: check CHECK365_BASE_URL")
    if not 400 <= status_code < 500:
        raise Check365Unavailable(f"unexpected status: {detail}")
    refusal = _refusal_message(parsed, secrets)
    if refusal is None:
        raise Check365Misconfigured(
            f"HTTP {status_code} that is not Check365's answer ({_what_it_is(parsed)}): check CHECK365_BASE_URL"
        )
    if status_code in (401, 403):
        raise Check365Rejected("unauthorized", detail)
    if status_code == 404:
        if _names_missing_job(refusal):
            raise Check365Rejected("job_not_found", detail)
        # Check365's envelope, but not its answer about a job: a route that does not exist.
        raise Check365Misconfigured(f"{detail} (not an unknown job): check CHECK365_BASE_URL")
    raise Check365Rejected("bad_request", detail)


def _refusal_message(parsed: object, secrets: tuple[str, ...]) -> str | None:
    """The message of Check365's refusal envelope, or None when the answer is not one."""
    if not isinstance(parsed, dict) or parsed.get("success") is not False or not isinstance(parsed.get("message"), str):
        return None
    return _message_of(parsed, secrets)


def _names_missing_job(message: str) -> bool:
    lowered = message.lower()
    names_job = "job" in lowered and any(m in lowered for m in _NOT_FOUND_MARKERS)
    return names_job or any(m in lowered for m in _JOB_MARKERS)


def _what_it_is(parsed: object) -> str:
    """A few words on what came instead of Check365's JSON (never its content: it may be anything)."""
    if parsed is _MALFORMED:
        return "not JSON"
    if isinstance(parsed, dict):
        return "a JSON object without a boolean 'success'"
    return f"JSON {type(parsed).__name__}"


def _raise_for_refusal(message: str) -> NoReturn:
    lowered = message.lower()
    detail = f"Check365 answered success=false: {message}" if message else "Check365 answered success=false"
    if _names_missing_job(message):
        raise Check365Rejected("job_not_found", detail)
    if any(m in lowered for m in _KEY_MARKERS):
        raise Check365Rejected("unauthorized", detail)
    # Anything else (a bare "not found" too: it does not say the job is unknown) may be
    # a hiccup on their side: try again later.
    raise Check365Unavailable(detail)


_MALFORMED: Final = object()


def _loads(body: bytes) -> object:
    # Returns a sentinel instead of raising: orjson's error keeps the whole
    # document, which must not hang off our exception as its context.
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _MALFORMED


def _message_of(parsed: dict[str, Any], secrets: tuple[str, ...]) -> str:
    message = parsed.get("message")
    if not isinstance(message, str):
        return ""
    # Redact before truncating: a cut could otherwise leave most of a secret. The
    # message goes into webhook bodies as well as logs, so it gets the log scrubber.
    return _scrubber(secrets).scrub(message)[:MAX_MESSAGE_CHARS]


@functools.lru_cache(maxsize=8)
def _scrubber(secrets: tuple[str, ...]) -> Redactor:
    # Every poll's message is scrubbed with the same few secrets: build the scrubber once.
    return Redactor(secrets, marker=_REDACTED)


def _progress(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    progress = float(value)
    if not math.isfinite(progress):
        return None
    return min(100.0, max(0.0, progress))


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            return parse_retry_after(value, time.time())
    return None


# --------------------------------------------------------------------------- big answers

_WS: Final = b" \t\n\r"
# A JSON token of the part before the results: a string (group 1), a structural
# character (group 2), or a run of a number or literal.
_OUTER_TOKEN: Final = re.compile(rb'[ \t\n\r]*(?:("(?:[^"\\]|\\.)*")|([{}\[\]:,])|[^ \t\n\r{}\[\]:,"]+)', re.DOTALL)
# Where one result object may end: "}" then "," and the next object's "{" (group 1
# set), or "}" then the "]" closing the array. A "}" inside a string or a nested
# object can look the same: each slice cut this way is confirmed by orjson.
_ITEM_END: Final = re.compile(rb"\}[ \t\n\r]*(?:(,)[ \t\n\r]*(?=\{)|\])")
# The exact reading, for answers where that shortcut fails: filler (group 1), then
# a string or a structural character, so that depth and strings are followed.
_TOKEN: Final = re.compile(rb'([^"{}\[\],]*)(?:"(?:[^"\\]|\\.)*"|[{}\[\],])', re.DOTALL)
# Outcomes of slicing besides a result: let orjson read the whole answer instead.
_WHOLE: Final = object()


class _Spool:
    """A body too big to hold: kept in an unlinked temporary file as it arrives."""

    def __init__(self) -> None:
        # Unlinked at once: nothing is left behind, even by a killed worker.
        self.file: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close(), or with its outcome
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.size += len(chunk)

    def finish(self) -> None:
        self.file.flush()

    def read(self, offset: int, length: int) -> bytes:
        # pread: no shared file position, and exactly the bytes asked for.
        return os.pread(self.file.fileno(), max(0, length), offset)

    def close(self) -> None:
        self.file.close()


class _Window:
    """The bytes of a spool from some offset on, read a block at a time."""

    def __init__(self, spool: _Spool, start: int) -> None:
        self._spool = spool
        self.base = start  # the offset of buf[0]
        self.buf = b""
        self.eof = False

    def more(self) -> bool:
        # A token longer than what is held is matched again from its start after each
        # read: reading at least as much again as is held keeps that linear in its length.
        size = max(_BLOCK_BYTES, len(self.buf))
        chunk = b"" if self.eof else self._spool.read(self.base + len(self.buf), size)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def drop_before(self, offset: int) -> None:
        if offset > self.base:
            self.buf = self.buf[offset - self.base :]
            self.base = offset

    def slice(self, start: int, end: int) -> bytes:
        return self.buf[start - self.base : end - self.base]


class SpooledResults:
    """The results of a big answer: where each starts in the spooled answer.

    ``len()`` is their number; ``json_slices`` gives them back as JSON arrays of
    Check365's own bytes, a part at a time. Every result is a JSON object.
    """

    def __init__(self, spool: _Spool, starts: array[int], end: int) -> None:
        self._spool = spool
        self._starts = starts
        self._end = end  # just after the last result

    def __len__(self) -> int:
        return len(self._starts)

    def json_slices(self, size: int) -> Iterator[bytes]:
        """The results as JSON arrays of ``size`` results (the last may be shorter)."""
        count = len(self._starts)
        for first in range(0, count, size):
            start = self._starts[first]
            if first + size < count:
                # Up to the next slice's first result, less the comma between.
                raw = self._spool.read(start, self._starts[first + size] - start).rstrip(_WS + b",")
            else:
                raw = self._spool.read(start, self._end - start)
            yield b"[" + raw + b"]"

    def close(self) -> None:
        self._spool.close()

    def __repr__(self) -> str:
        return f"SpooledResults(count={len(self._starts)}, size={self._spool.size})"


@dataclass
class _Sliced:
    starts: array[int]
    end: int  # just after the last result
    close: int  # just after the array's "]"


def _classify_spool(spool: _Spool, job_id: str, secrets: tuple[str, ...], whole_read_max: int) -> PollOutcome:
    """``classify_response`` for a 2xx answer spooled to a file."""
    keep = False
    try:
        parsed = _parse_sliced(spool)
        if parsed is _WHOLE:
            # Not shaped like a completed answer (or shaped too oddly to slice):
            # orjson reads it whole, as it would a small answer.
            if spool.size > whole_read_max:
                raise Check365Unavailable(
                    f"an answer of {spool.size:,} bytes not shaped like a completed job's is too large to read"
                )
            parsed = _loads(spool.read(0, spool.size))
        outcome = _classify_parsed(parsed, job_id, secrets, cut_object=_cut_object(spool.read(0, 64)))
        answer = outcome.answer if isinstance(outcome, Incomplete) else outcome
        keep = isinstance(answer, Completed) and isinstance(answer.data.get("results"), SpooledResults)
        return outcome
    finally:
        if not keep:
            spool.close()


def _parse_sliced(spool: _Spool) -> object:
    """The answer as orjson parses it, except that ``data.results`` is a ``SpooledResults``.

    Returns ``_MALFORMED`` for what orjson would refuse, and ``_WHOLE`` for an
    answer to parse whole instead.
    """
    opening = _results_opening(spool)
    if opening is None:
        return _WHOLE
    sliced = _slice_results(spool, opening)
    if not isinstance(sliced, _Sliced):
        return _WHOLE if sliced is None else _MALFORMED
    # The rest of the answer with a unique string where the results were: orjson
    # checks it, and the string must come back as data.results (a repeated "data"
    # or "results" key would put something else there).
    marker = random_tokens.token_hex(16)
    outer = spool.read(0, opening) + b'"' + marker.encode() + b'"' + spool.read(sliced.close, spool.size - sliced.close)
    parsed = _loads(outer)
    if parsed is _MALFORMED:
        return _MALFORMED
    data = parsed.get("data") if isinstance(parsed, dict) else None
    if not isinstance(data, dict) or data.get("results") != marker:
        return _WHOLE
    data["results"] = SpooledResults(spool, sliced.starts, sliced.end)
    return parsed


def _results_opening(spool: _Spool) -> int | None:
    """The offset of the "[" that opens ``data.results``, or None when there is none."""
    window = _Window(spool, 0)
    nesting = b""  # the open containers, innermost last
    keys: list[object] = []  # the current key of each open container (None in arrays)
    # keys == ["data", "results"] thus means: in the value of "results" in the value of "data".
    want_key = False
    pos = 0
    while pos < _MAX_PREFIX_BYTES:
        match = _OUTER_TOKEN.match(window.buf, pos - window.base)
        if match is None:
            # A string cut by the end of what was read, or nothing left.
            window.drop_before(pos)
            if window.more():
                continue
            return None
        pos = window.base + match.end()
        string, mark = match.group(1), match.group(2)
        if string is not None:
            if want_key and nesting[-1:] == b"{":
                # Only the keys of the two outer levels matter; escapes count ("res\u0075lts").
                keys[-1] = _loads(string) if len(nesting) <= 2 else True
        elif mark == b"[" and keys == ["data", "results"] and not want_key:
            return pos - 1
        elif mark in (b"{", b"["):
            if not nesting and mark != b"{":
                return None  # not an object: nothing to slice
            nesting += mark
            keys.append(None)
            want_key = mark == b"{"
        elif mark in (b"}", b"]"):
            nesting = nesting[:-1]
            keys = keys[:-1]
            if not nesting:
                return None
        elif mark == b":":
            want_key = False
        elif mark == b",":
            want_key = nesting[-1:] == b"{"
    return None


def _first_result(spool: _Spool, opening: int) -> tuple[int, bool] | None:
    """Where the first result starts (or the "]" of an empty array), and whether it is empty."""
    window = _Window(spool, opening + 1)
    while True:
        rest = window.buf.lstrip(_WS)
        if rest:
            at = window.base + len(window.buf) - len(rest)
            if rest[:1] == b"]":
                return at, True
            return (at, False) if rest[:1] == b"{" else None
        window.drop_before(window.base + len(window.buf))
        if not window.more():
            return None


def _slice_results(spool: _Spool, opening: int) -> _Sliced | object | None:
    """Cut ``data.results`` into its results; None when it is not an array of objects."""
    first = _first_result(spool, opening)
    if first is None:
        return None
    at, empty = first
    if empty:
        return _Sliced(array("q"), at, at + 1)
    fast = _slice_fast(spool, at)
    return fast if fast is not None else _slice_exact(spool, at)


def _confirmed(raw: bytes, count: int) -> bool:
    """Whether ``raw`` is exactly ``count`` JSON objects separated by commas."""
    try:
        parsed = orjson.loads(b"[" + raw + b"]")
    except orjson.JSONDecodeError:
        return False
    return len(parsed) == count and all(isinstance(r, dict) for r in parsed)


def _slice_fast(spool: _Spool, first: int) -> _Sliced | None:
    """Cut at every ``_ITEM_END``; None as soon as a slice is not confirmed.

    Confirming a slice of n candidate results as n objects proves every cut in it
    real: a cut inside a string or a nested object leaves a string or an object
    open, or fewer results.
    """
    window = _Window(spool, first)
    starts = array("q", [first])
    start = pos = first  # the first result not yet confirmed; where to search on
    pending = 0  # results since ``start`` ended by a candidate
    while True:
        buf, base = window.buf, window.base
        # Search up to the last "}" read: a candidate starting there may not be whole.
        stop = len(buf) if window.eof else max(buf.rfind(b"}", pos - base), pos - base)
        for match in _ITEM_END.finditer(buf, pos - base, stop):
            end = base + match.start() + 1
            pending += 1
            closing = match.group(1) is None
            if (closing or pending == _BATCH) and not _confirmed(window.slice(start, end), pending):
                return None
            if closing:
                return _Sliced(starts, end, base + match.end())
            starts.append(base + match.end())
            if pending == _BATCH:
                start, pending = starts[-1], 0
        pos = base + stop
        if window.eof:
            return None  # no "]" after an object: not for this shortcut
        window.drop_before(start)
        window.more()


def _slice_exact(spool: _Spool, first: int) -> _Sliced | object | None:
    """Cut by following strings and nesting: slower, for results that fool the shortcut.

    Returns None for an array that is not only objects, ``_MALFORMED`` for
    results that orjson refuses.
    """
    window = _Window(spool, first)
    starts: array[int] = array("q")
    unconfirmed = 0  # the index in ``starts`` of the first result not yet confirmed
    depth = 0  # 0 between results
    closed = False  # a result has ended since the last comma
    end = pos = first
    while True:
        match = _TOKEN.match(window.buf, pos - window.base)
        if match is None:
            # A string cut by the end of what was read; at the end of the answer,
            # an array that never closes.
            window.drop_before(min(pos, starts[unconfirmed]) if unconfirmed < len(starts) else pos)
            if window.more():
                continue
            return _MALFORMED
        pos = window.base + match.end()
        char = window.buf[match.end() - 1 : match.end()]
        if depth == 0 and (match.group(1).strip(_WS) or char in (b'"', b"[", b"}")):
            return None  # a value that is not an object, or garbage: orjson decides
        if char in (b"{", b"["):
            if depth == 0:
                if closed:
                    return None  # two values without a comma
                starts.append(pos - 1)
            depth += 1
        elif char in (b"}", b"]") and depth > 0:
            depth -= 1
            if depth == 0:
                end, closed = pos, True
                if len(starts) - unconfirmed == _BATCH:
                    if not _confirmed(window.slice(starts[unconfirmed], end), _BATCH):
                        return _MALFORMED
                    unconfirmed = len(starts)
        elif char == b"]":
            if not closed:
                return None  # a trailing comma
            if unconfirmed < len(starts) and not _confirmed(
                window.slice(starts[unconfirmed], end), len(starts) - unconfirmed
            ):
                return _MALFORMED
            return _Sliced(starts, end, pos)
        elif char == b"," and depth == 0:
            if not closed:
                return None
            closed = False
