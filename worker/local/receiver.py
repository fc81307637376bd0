"""A local webhook receiver for the demo and the tests.

It records every POST, checks its Standard Webhooks signature with the reference
``standardwebhooks`` package (not with this project's own signing code, so that a
signing bug cannot hide itself), and answers what the test scripted: failures,
redirects, 429 with Retry-After, 410 Gone, and answers that come late (a slow
receiver: the POST is recorded at once, the answer is sent after the delay), or
trickled a byte at a time (each byte inside any read timeout, the whole answer not).

Control surface for tests that run the worker in other processes (paths under
``/_rx/`` are reserved and never recorded):

    GET  /_rx/received[?path=/hook]   the recorded POSTs, bodies as text
    POST /_rx/script                  {"path", "responses": [[status, {headers}, delay_s, trickle_s] | status, ...],
                                       "default": status | [status, {headers}, delay_s] | null}
"""

from __future__ import annotations

import functools
import importlib
import logging
import random
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from worker.local.httpserver import NO_LATENCY, Latency, LocalServer, QuietHandler, ServerThread

# A status, optionally with headers, optionally answered only after a delay in seconds,
# optionally sent a byte every trickle seconds.
Response = (
    int
    | tuple[int, Mapping[str, str]]
    | tuple[int, Mapping[str, str], float]
    | tuple[int, Mapping[str, str], float, float]
)

CONTROL_PREFIX = "/_rx/"
# Webhook bodies are a part of at most WEBHOOK_MAX_RESULTS_PER_PART results; this
# is far above any sensible setting and only guards the test process's memory.
MAX_BODY = 64 << 20

_log = logging.getLogger(__name__)


@dataclass
class Received:
    at: float
    path: str  # without the query string
    headers: dict[str, str]  # names in lower case
    body: bytes
    verified: bool
    error: str | None  # why verification failed
    status_sent: int
    client_port: int = 0  # the sender's TCP port: tells which process sent it

    def json(self) -> Any:
        return orjson.loads(self.body)

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "path": self.path,
            "headers": self.headers,
            "body": self.body.decode("utf-8", errors="replace"),
            "verified": self.verified,
            "error": self.error,
            "status_sent": self.status_sent,
            "client_port": self.client_port,
        }


def _webhook_class() -> Callable[[str], Any]:
    try:
        module = importlib.import_module("standardwebhooks")
    except ImportError:
        raise ImportError(
            "the webhook receiver verifies signatures with the 'standardwebhooks' package; "
            "install it with: pip install standardwebhooks (or the package's [demo] extra)"
        ) from None
    webhook: Callable[[str], Any] = module.Webhook
    return webhook


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: dict[str, str]
    delay_s: float = 0.0
    trickle_s: float = 0.0


def _normalise(response: Response) -> _Answer:
    if isinstance(response, int):
        status, headers, delay, trickle = response, {}, 0.0, 0.0
    else:
        status, headers = int(response[0]), {str(k): str(v) for k, v in response[1].items()}
        delay = float(response[2]) if len(response) > 2 else 0.0
        trickle = float(response[3]) if len(response) > 3 else 0.0
    if not 100 <= status <= 599:
        raise ValueError(f"not an HTTP status: {status}")
    if not 0.0 <= delay <= 3600.0:
        raise ValueError(f"the delay must be between 0 and 3600 seconds, got {delay}")
    if not 0.0 <= trickle <= 60.0:
        raise ValueError(f"the trickle must be between 0 and 60 seconds a byte, got {trickle}")
    return _Answer(status, headers, delay, trickle)


class Receiver(LocalServer):
    """Records and verifies signed webhooks on a loopback port."""

    _thread_name = "webhook-receiver"

    def __init__(
        self,
        secret: str | list[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_receive: Callable[[Received], None] | None = None,
        latency: Latency = NO_LATENCY,
    ) -> None:
        webhook = _webhook_class()
        secrets = [secret] if isinstance(secret, str) else list(secret)
        if not secrets:
            raise ValueError("at least one webhook secret is needed")
        self._verifiers = [webhook(s) for s in secrets]
        self.on_receive = on_receive
        self._cond = threading.Condition()
        self._received: list[Received] = []
        self._scripts: dict[str, deque[_Answer]] = {}
        self._defaults: dict[str, _Answer] = {}
        self._in_flight: list[Received] = []
        # Every webhook is answered this long after it arrived, before any scripted delay.
        self.latency = latency
        self._latency_rng = random.Random(2)
        self._server = ServerThread(functools.partial(_ReceiverHandler, self), host, port)

    # scripting and observing

    def script(self, path: str, responses: Sequence[Response]) -> None:
        """Queue the next answers to POSTs on ``path``, after any already queued."""
        answers = [_normalise(r) for r in responses]
        with self._cond:
            self._scripts.setdefault(path, deque()).extend(answers)

    def default(self, path: str, status: int, headers: Mapping[str, str] | None = None, delay_s: float = 0.0) -> None:
        """The answer on ``path`` once its script has run out (200 at once unless set)."""
        answer = _normalise((status, headers or {}, delay_s))
        with self._cond:
            self._defaults[path] = answer

    def in_flight(self) -> list[Received]:
        """POSTs recorded whose answer has not been sent yet (a slow answer is on its way)."""
        with self._cond:
            return list(self._in_flight)

    def received(self, path: str | None = None) -> list[Received]:
        with self._cond:
            return [r for r in self._received if path is None or r.path == path]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> list[Received]:
        """Every POST received so far, once ``predicate`` holds for them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = list(self._received)
                if predicate(snapshot):
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(_timeout_message(timeout, snapshot))
                self._cond.wait(remaining)

    # answering

    def _verify(self, body: bytes, headers: dict[str, str]) -> tuple[bool, str | None]:
        error: str | None = None
        for verifier in self._verifiers:
            try:
                # json_parse=False: the signature is over the raw bytes, and a
                # signed body that is not JSON is still correctly signed.
                verifier.verify(body, headers, json_parse=False)
            except Exception as exc:  # a malformed header fails in many ways; each means "not verified"
                error = f"{type(exc).__name__}: {exc}"
            else:
                return True, None
        return False, error

    def _record(
        self, path: str, headers: dict[str, str], body: bytes, client_port: int = 0
    ) -> tuple[Received, _Answer]:
        verified, error = self._verify(body, headers)
        with self._cond:
            queued = self._scripts.get(path)
            answer = queued.popleft() if queued else self._defaults.get(path, _Answer(200, {}))
            item = Received(time.time(), path, headers, body, verified, error, answer.status, client_port)
            self._received.append(item)
            # In flight from the moment the POST is recorded until its answer is sent
            # (``_answered``), so a test can act while deliveries are under way.
            self._in_flight.append(item)
            self._cond.notify_all()
        callback = self.on_receive
        if callback is not None:
            try:
                callback(item)
            except Exception:
                # A broken printing callback must not turn into a failed delivery.
                _log.exception("on_receive callback failed")
        return item, answer

    def _answered(self, item: Received) -> None:
        with self._cond:
            # By identity: two recorded requests may well compare equal.
            self._in_flight = [r for r in self._in_flight if r is not item]
            self._cond.notify_all()

    def _control_script(self, payload: Mapping[str, Any]) -> None:
        path = str(payload["path"])
        responses: list[Response] = [
            r
            if isinstance(r, int)
            else (r[0], r[1] if len(r) > 1 else {}, r[2] if len(r) > 2 else 0.0, r[3] if len(r) > 3 else 0.0)
            for r in payload.get("responses", [])
        ]
        self.script(path, responses)
        default = payload.get("default")
        if default is not None:
            if isinstance(default, int):
                self.default(path, default)
            else:
                self.default(
                    path,
                    int(default[0]),
                    default[1] if len(default) > 1 else None,
                    float(default[2]) if len(default) > 2 else 0.0,
                )


def _timeout_message(timeout: float, received: list[Received]) -> str:
    recent = "; ".join(
        f"{r.path} id={r.headers.get('webhook-id', '-')} verified={r.verified} -> {r.status_sent}"
        for r in received[-10:]
    )
    return f"the condition did not hold within {timeout:g} s; {len(received)} POST(s) received" + (
        f", the last: {recent}" if recent else ""
    )


class _ReceiverHandler(QuietHandler):
    server_version = "webhook-receiver"

    def __init__(self, receiver: Receiver, *args: Any) -> None:
        self.receiver = receiver
        super().__init__(*args)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != CONTROL_PREFIX + "received":
            self.send_json(405 if not parts.path.startswith(CONTROL_PREFIX) else 404, {"error": "not found"})
            return
        wanted = dict(parse_qsl(parts.query)).get("path")
        self.send_json(200, [r.to_json() for r in self.receiver.received(wanted)])

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        body = self.read_body(MAX_BODY)
        if body is None:
            return
        if path.startswith(CONTROL_PREFIX):
            self._control(path, body)
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        item, answer = self.receiver._record(path, headers, body, int(self.client_address[1]))
        try:
            self.receiver.latency.wait(self.receiver._latency_rng)
            if answer.delay_s:
                # A slow receiver: the request has arrived and is recorded, the answer
                # comes late (after a client's timeout, it reaches nobody).
                time.sleep(answer.delay_s)
            if answer.trickle_s:
                self._trickle(item.status_sent, answer)
            else:
                self.send_json(item.status_sent, {"status": item.status_sent}, answer.headers)
        finally:
            self.receiver._answered(item)

    def _trickle(self, status: int, answer: _Answer) -> None:
        body = orjson.dumps({"status": status})
        head = [f"HTTP/1.1 {status} Trickled", "Content-Type: application/json", f"Content-Length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in answer.headers.items()]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self.close_connection = True
        for i in range(len(raw)):
            try:
                self.wfile.write(raw[i : i + 1])
                self.wfile.flush()
            except OSError:
                return  # the client gave up (or was killed): nobody is reading any more
            if self._client_gone(answer.trickle_s):
                return

    def _client_gone(self, wait_s: float) -> bool:
        """Wait ``wait_s``; True as soon as the client closes its end of the connection.

        A write to a closed connection fails only a write or two later: until then the
        request would still count as in flight here while the client has moved on.
        """
        deadline = time.monotonic() + wait_s
        readable, _, _ = select.select([self.connection], [], [], wait_s)
        if readable:
            try:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    return True
            except OSError:
                return True
            time.sleep(max(0.0, deadline - time.monotonic()))  # bytes from the client, not its end
        return False

    def _control(self, path: str, body: bytes) -> None:
        if path != CONTROL_PREFIX + "script":
            self.send_json(404, {"error": "not found"})
            return
        try:
            payload = orjson.loads(body)
            if not isinstance(payload, dict):
                raise TypeError("the body must be a JSON object")
            self.receiver._control_script(payload)
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
            self.send_json(400, {"error": f"bad request: {exc!s}"})
            return
        self.send_json(200, {"ok": True})
