"""The message boundary: what Celery takes apart before any task code runs.

Celery decodes every message in the worker's main process. What it cannot take apart
there raises and stops the whole worker ("Unrecoverable error"); the message, still
unacked, goes back on the queue and stops the next worker too. ``CheckedConsumer``
and ``CheckedRequest`` turn each such message into a logged rejection
(``watch_rejected`` or ``delivery_rejected``) through Celery's own invalid-task path:
logged, dropped, never re-queued.

The Celery internals these classes rely on are named, and checked against the
installed release, in ``worker.intake.celery_internals``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from celery import Task, signals
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer
from celery.worker.request import Request

from check365_client.rules import nested_deeper_than
from worker.intake.celery_internals import (
    after_failed_connection_cleanup,
    forget_uncancelled_acks,
    payload,
    tolerate_torn_down_channel,
)
from worker.runtime import logs
from worker.runtime.celeryconfig import DELIVER_TASK, MAX_ETA_KEY

log = logs.get_logger("check365.boundary")


def reject(event: str, reason: str, **fields: Any) -> None:
    """Log a refused message with its reason (cut short: the reason may quote the message)."""
    log.warning(event, reason=reason[:300], **fields)


_NONE = type(None)
# The headers of Celery's message protocol 2 that its worker reads, and their types.
# Others are ignored by Celery and so by these checks.
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "task": (str,),
    "lang": (str, _NONE),
    "shadow": (str, _NONE),
    "root_id": (str, _NONE),
    "parent_id": (str, _NONE),
    "group": (str, _NONE),
    "group_index": (int, _NONE),
    "groups": (list, _NONE),
    "origin": (str, _NONE),
    "argsrepr": (str, _NONE),
    "kwargsrepr": (str, _NONE),
    "retries": (int, _NONE),
    "replaced_task_nesting": (int, _NONE),
    "ignore_result": (bool, _NONE),
    "timelimit": (list, tuple, _NONE),
    "eta": (str, _NONE),
    "expires": (str, _NONE),
    "stamped_headers": (list, _NONE),
    "stamps": (dict, _NONE),
}


def _is_seconds_or_none(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _header_problem(headers: dict[Any, Any]) -> str | None:
    for name, types in _HEADER_TYPES.items():
        if name in headers and not isinstance(headers[name], types):
            return f"the {name} header has the wrong type ({type(headers[name]).__name__})"
    limits = headers.get("timelimit")
    if limits is not None and not (len(limits) == 2 and all(_is_seconds_or_none(v) for v in limits)):
        # Unpacked when the task goes to the pool, for a countdown in a timer callback
        # whose failure would leave the message unacked, to come back forever.
        return "the timelimit header must be [soft, hard] seconds"
    # Used as keys when Celery checks revocations.
    for name in ("stamped_headers", "groups"):
        if not all(isinstance(v, str) for v in headers.get(name) or ()):
            return f"the {name} header must be a list of strings"
    return None


# Far deeper than any watch or delivery message needs (metadata is a small JSON object).
# A body nested much deeper cannot even be handed to the pool: pickling it recurses past
# Python's limit, after Celery has counted the message as running.
MAX_NESTING = 64


def _body_problem(request: Request) -> str | None:
    if not isinstance(request.id, str):
        return "the task id must be a string"  # protocol 1 carries it in the body
    args, kwargs, embed = payload(request)
    # The request holds the headers, args and kwargs: all of it goes to the pool.
    if nested_deeper_than(request.request_dict, MAX_NESTING) or nested_deeper_than(embed, MAX_NESTING):
        return f"the message is nested deeper than {MAX_NESTING} levels"
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "the body must be [args (a list), kwargs (an object), options]"
    if "self" in kwargs:
        # Celery's own call wrapper takes ``self``: the task would fail before it starts.
        return "unknown fields: self"
    if embed is not None and not isinstance(embed, dict):
        return "the body's options must be an object"
    workflow = [name for name in _WORKFLOW if (embed or {}).get(name)]
    if workflow:
        # Celery would follow them after the task returned, outside the task's own error
        # handling; and an outcome is announced by its webhook, not by a return value.
        return f"callbacks, errbacks, chains and chords are not accepted (found {', '.join(workflow)})"
    return _header_problem(request.request_dict)


# The options of a body that Celery follows after a task (link, link_error, chains, chords).
_WORKFLOW = ("callbacks", "errbacks", "chain", "chord")


class CheckedRequest(Request):  # type: ignore[misc] # Celery is untyped
    """Celery's request, raising ``InvalidTaskError`` for whatever it cannot take apart.

    ``InvalidTaskError`` is what Celery's consumer expects: it logs, drops the message and
    sends ``task_rejected`` (logged as ours below). A body that is not an [args, kwargs,
    options] triple, for one, makes the stock class raise a ValueError.
    """

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except InvalidTaskError:
            raise
        except Exception as exc:  # anything a malformed message makes Celery raise
            raise InvalidTaskError(f"malformed task message: {type(exc).__name__}: {exc}"[:300]) from None
        problem = _body_problem(self)
        if problem is not None:
            raise InvalidTaskError(problem)
        # A step the threads pool could not cancel (or one still queued in it) may finish
        # after the broker connection was lost and replaced; its ack must not stop the worker.
        tolerate_torn_down_channel(self)


class CheckedTask(Task):  # type: ignore[misc] # Celery is untyped
    """The tasks' base: their messages are taken apart by ``CheckedRequest``."""

    Request = CheckedRequest


def _decoded(message: Any) -> object:
    """The message's body as Celery will see it; a list when it does not decode (Celery reports that itself)."""
    try:
        return message.payload
    except Exception:  # decoding fails in many ways; Celery reports it when it decodes in turn
        return []


def _routing_problem(message: Any) -> str | None:
    """What Celery would choke on while it finds a message's task, before any request exists."""
    headers = message.headers
    body = _decoded(message)
    if isinstance(headers, dict) and "task" in headers:
        if not isinstance(body, list | tuple | dict):
            # Celery's strategy asks ``"args" in body`` before anything else.
            return "the body must be [args, kwargs, options]"
        return _header_problem(headers)
    # Protocol 1: the task's name is in the body.
    if isinstance(body, dict) and "task" in body and not isinstance(body["task"], str):
        return "the task name must be a string"
    return None


def _limits_problem(app: Any, headers: Any) -> str | None:
    """A message may lower its task's time limit, never raise or lift it, and wait no longer than we ever ask.

    Celery takes a message's ``timelimit`` before the task's own, and would hold an ``eta``
    for as long as it says: either would break the lease arithmetic (docs/design.md).
    """
    if not isinstance(headers, dict):
        return None
    task = app.tasks.get(headers.get("task")) if isinstance(headers.get("task"), str) else None
    limits = headers.get("timelimit")
    if task is not None and isinstance(limits, list | tuple):
        own = task.time_limit or app.conf.task_time_limit
        for value in limits:
            if value is None or value == 0:  # Celery's "none asked": the task's own limit holds
                continue
            if not math.isfinite(value) or value < 0 or (own and value > own):
                return f"the timelimit header may only lower the task's time limit ({own:g} s), got {value!r}"[:200]
    eta = headers.get("eta")
    if isinstance(eta, str):
        try:
            at = datetime.fromisoformat(eta)
        except ValueError:
            return "the eta header must be an ISO 8601 time"
        if at.tzinfo is None:  # Celery reads a naive eta as UTC
            at = at.replace(tzinfo=UTC)
        ahead = (at - datetime.now(UTC)).total_seconds()
        longest = app.conf.get(MAX_ETA_KEY)
        if isinstance(longest, int | float) and ahead > longest:
            return f"the eta is {ahead:.0f} s ahead, beyond the longest delay this worker sends ({longest:g} s)"
    return None


class CheckedConsumer(Consumer):  # type: ignore[misc] # Celery is untyped
    """The worker's consumer (``worker_consumer``): checks the headers before Celery routes a message.

    A task name that is not a string (a list: "unhashable type") raises while Celery looks
    the task up, and a header of the wrong type raises after the request was registered,
    which leaves the worker's slot taken forever. Both are rejected before that.
    """

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.connection_errors)

        def reject(message: Any, reason: Exception) -> None:
            _log_rejected_message(message, reason)
            message.reject_log_error(log, connection_errors)

        def on_task_received(message: Any) -> Any:
            problem = _routing_problem(message) or _limits_problem(self.app, message.headers)
            if problem is not None:
                return reject(message, InvalidTaskError(problem))
            try:
                return handle(message)
            except connection_errors:
                raise  # the consumer reconnects; the message is redelivered
            except Exception as exc:  # a path the checks above missed: never stop the worker for it
                log.error("message_crashed_consumer", error=f"{type(exc).__name__}: {exc}"[:300], exc_info=True)
                if not message.acknowledged:
                    reject(message, exc)
                return None

        return on_task_received

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            # When the broker connection is lost (Redis restarted), kombu forgets the lost
            # connection's parameters and then closes its channel, which restores the
            # reserved messages and so needs them: AttributeError ('NoneType' object has no
            # attribute 'hostname') instead of a connection error, and Celery stops the
            # worker as "Unrecoverable" (on most Redis restarts in tests/reliability). The
            # messages stay reserved in Redis, where the visibility timeout and the sweep
            # bring them back; what Celery skipped after the failure is done here.
            log.warning("broker_connection_cleanup_failed", error=f"{type(error).__name__}: {error}"[:300])
            after_failed_connection_cleanup(self)
        forget_uncancelled_acks(self)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        # Celery logs a body that does not decode and acks it, but sends no signal:
        # without this it would be missing from our rejections.
        _log_rejected_message(message, exc)
        super().on_decode_error(message, exc)


@signals.task_rejected.connect
def _log_rejected_message(message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    task_id = headers.get("id")
    event = "delivery_rejected" if headers.get("task") == DELIVER_TASK else "watch_rejected"
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else "not a task message (no task name)"
    reject(event, reason, task_id=task_id if isinstance(task_id, str) else None)


@signals.task_unknown.connect
def _log_unknown_task(name: Any = None, id: Any = None, **_: Any) -> None:
    # Messages on this worker's queues are watches and deliveries; any other name is a foreign producer's mistake.
    reject("watch_rejected", f"unknown task name {str(name)[:100]!r}", task_id=id if isinstance(id, str) else None)
