"""One structlog pipeline for our logs, Celery's and httpx's.

Every record, whether it comes from ``structlog.get_logger()`` or from a stdlib
logger (Celery, kombu, httpx), goes through the same processors, so the secret
redaction below applies to all of them: the Check365 API key travels in a query
string and would otherwise show up in httpx's request lines.

Our own lines do not pass through the stdlib ``logging`` module: a stdlib record
(caller lookup, LogRecord, the handler's lock, the formatter's copies) cost about
120 µs of CPU per line with 64 threads logging at once, the structlog-native path
under 50 µs for the same line (3 lines a job). Both paths end in one ``LineWriter``,
so lines from either never interleave.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog
from celery.worker.consumer import consumer as celery_consumer
from structlog.typing import FilteringBoundLogger

from worker.delivery.events import iso_second
from worker.settings import Settings

REDACTED = "***"
# The loggers of Celery's per-task "received" and "succeeded" lines.
CELERY_PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")
# Beat's logger: it says "Scheduler: Sending due task ..." at INFO at every tick.
CELERY_BEAT_LOGGER = "celery.beat"
# Any api_key query parameter, whoever logs it and whatever its value.
_API_KEY_PARAM = re.compile(r"(api_key=)[^&\s\"']+", re.IGNORECASE)
# Whatever the key, a webhook secret literal never belongs in a log line.
_WHSEC = re.compile(r"whsec_[A-Za-z0-9+/=]+")


class Redactor:
    """A structlog processor that scrubs secrets from every string in the event.

    ``scrub`` also serves text that leaves the worker by other ways, such as the
    messages Check365 sends back, with the ``marker`` that suits it.
    """

    def __init__(self, secrets: Iterable[str], marker: str = REDACTED) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._marker = marker

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, self._marker)
        # Most strings hold neither pattern: a substring test is far cheaper than a regex pass.
        if "=" in text:
            text = _API_KEY_PARAM.sub(lambda m: m.group(1) + self._marker, text)
        if "whsec_" in text:
            text = _WHSEC.sub("whsec_" + self._marker, text)
        return text

    def _clean_text(self, text: str) -> bool:
        """Whether ``scrub`` would leave ``text`` as it is, known without changing it."""
        return "=" not in text and "whsec_" not in text and not any(s in text for s in self._secrets)

    def _clean(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if depth > 4:
            return value
        if isinstance(value, dict):
            return {k: self._clean(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v, depth + 1) for v in value)
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # Most lines hold plain strings and numbers, none with anything to scrub: their
        # strings are searched once, together (the separator is in no secret worth a search).
        values = event_dict.values()
        if all(v.__class__ in _PLAIN or v.__class__ is str for v in values) and self._clean_text(
            "\x00".join([v for v in values if v.__class__ is str])
        ):
            return event_dict
        for key, value in event_dict.items():
            kind = value.__class__
            if kind is str:
                event_dict[key] = self.scrub(value)
            elif kind not in _PLAIN:
                event_dict[key] = self._clean(value)
        return event_dict


_PLAIN = frozenset({int, float, bool, type(None)})


def _timestamp(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The time of the line, UTC, to the microsecond (structlog's ISO ``TimeStamper``, each second formatted once)."""
    now = time.time()
    whole = int(now)
    event_dict["timestamp"] = f"{iso_second(whole)}.{int((now - whole) * 1_000_000):06d}Z"
    return event_dict


# Celery's records that quote a message whole (its body, or headers holding kwargsrepr).
_MESSAGE_DUMPS = (
    celery_consumer.INVALID_TASK_ERROR,
    celery_consumer.UNKNOWN_TASK_ERROR,
    celery_consumer.UNKNOWN_FORMAT,
    celery_consumer.MESSAGE_DECODE_ERROR,
)


def hide_task_arguments(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Keep a task's arguments out of Celery's lines, as secrets are kept out of every line.

    A callback URL may carry the receiver's token in its query, and metadata is the
    producer's business: Celery puts both in a failed (or received) task's ``data`` and
    quotes whole messages when it refuses one. The job id is bound to each task's
    lines anyway (worker/runtime/signals.py), and the reason of a refusal is kept.
    """
    data = event_dict.get("data")
    if isinstance(data, dict) and ("args" in data or "kwargs" in data):
        event_dict["data"] = {**data, **{k: REDACTED for k in ("args", "kwargs") if k in data}}
    record = event_dict.get("_record")
    template = getattr(record, "msg", None)
    if isinstance(record, logging.LogRecord) and isinstance(template, str) and template in _MESSAGE_DUMPS:
        first_line = str(event_dict.get("event", "")).split("\n", 1)[0]
        if template == celery_consumer.MESSAGE_DECODE_ERROR:
            first_line = first_line.split(" [type:", 1)[0]  # the headers follow, with kwargsrepr
        event_dict["event"] = f"{first_line} (the message's contents are not logged)"
    return event_dict


class _RoutineAtDebug(logging.Filter):
    """Beat's line per sent task is routine, like the worker's per-task lines: DEBUG.

    A filter rather than a level on beat's logger, which would also hide its
    start-up line and its errors.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and str(record.msg).startswith("Scheduler: Sending due task"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


class _ScrubRenderedExceptions:
    """Tracebacks are rendered to text by format_exc_info: scrub them after that."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        exc = event_dict.get("exception")
        if isinstance(exc, str):
            event_dict["exception"] = self._redactor.scrub(exc)
        return event_dict


def _scrubbed_traceback(redactor: Redactor) -> Callable[[TextIO, Any], None]:
    """The console's traceback writer: it renders after the redactor ran, so it scrubs its own text."""

    def write(out: TextIO, exc_info: Any) -> None:
        text = io.StringIO()
        structlog.dev.plain_traceback(text, exc_info)
        out.write(redactor.scrub(text.getvalue()))

    return write


def _json_dumps(value: Any, **_: Any) -> str:
    # orjson: several times faster than json.dumps on every line; str() for the odd object.
    try:
        return orjson.dumps(value, default=str).decode()
    except orjson.JSONEncodeError:
        # A lone surrogate (from a hostile message) is not UTF-8; json escapes it instead.
        return json.dumps(value, default=str)


# Lines to a pipe or a file wait at most this long to be written together (see LineWriter).
FLUSH_INTERVAL_S = 0.05
# A buffer this full is written at once, whatever the time.
_BUFFER_MAX_BYTES = 256 * 1024
_writers: weakref.WeakSet[LineWriter] = weakref.WeakSet()
_current: LineWriter | None = None


class LineWriter:
    """Writes whole rendered lines to one stream; lines from any thread never interleave.

    A pipe or a file (production's JSON logs) gets its lines in batches: a line joins a
    buffer, written with one ``os.write`` by a thread of the writer's own every
    ``FLUSH_INTERVAL_S``, or at once when the buffer is full, when a warning or an error
    joins it (``urgent``), before a fork and at exit. Each write is a system call, and in
    a worker of many threads each one hands the interpreter lock to another thread: one
    write per line cost 0.15 ms of the worker's CPU per small job (three lines), about a
    twentieth of it, in the throughput benchmark (A/B, at 0 and at 250 ms). A worker
    killed outright loses at most the last ``FLUSH_INTERVAL_S`` of its info lines. A
    terminal gets each line as it comes, and so does a stream without a file descriptor
    (written through its own ``write``).
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # the buffer
        self._write_lock = threading.Lock()  # the descriptor: batches go out in order
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._fd: int | None = None
        self._batched = False
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        if isinstance(fd, int) and fd >= 0:
            stream.flush()  # what was written through the stream before comes first
            self._fd = fd
            self._batched = not os.isatty(fd)
        _writers.add(self)

    def write(self, line: str, *, urgent: bool = False) -> None:
        if self._fd is None:
            try:
                with self._lock:
                    self._stream.write(line + "\n")
            except (OSError, ValueError):
                pass  # nowhere left to log to: a step must not fail for that
            return
        data = (line + "\n").encode("utf-8", "backslashreplace")
        with self._lock:
            self._pending.append(data)
            self._pending_bytes += len(data)
            now = urgent or not self._batched or self._closed or self._pending_bytes >= _BUFFER_MAX_BYTES
            if not now and self._flusher is None:
                now = not self._start_flusher()
        if now:
            self.flush()

    def flush(self) -> None:
        """Write what the buffer holds, now."""
        with self._write_lock:
            with self._lock:
                batch, self._pending, self._pending_bytes = self._pending, [], 0
            if not batch or self._fd is None:
                return
            data = b"".join(batch)
            try:
                while data:
                    data = data[os.write(self._fd, data) :]
            except (OSError, ValueError):
                pass  # nowhere left to log to (a closed pipe): a step must not fail for that

    def close(self) -> None:
        """Write what is left; later lines are written as they come (this writer was replaced)."""
        self._closed = True
        self.flush()

    def _start_flusher(self) -> bool:
        flusher = threading.Thread(target=self._flush_every_interval, name="log-writer", daemon=True)
        try:
            flusher.start()
        except RuntimeError:  # no new thread (the interpreter is exiting): each line is written at once
            self._batched = False
            return False
        self._flusher = flusher
        return True

    def _flush_every_interval(self) -> None:
        while not self._closed:
            time.sleep(FLUSH_INTERVAL_S)
            self.flush()

    def _after_fork_in_child(self) -> None:
        # The parent's threads are gone in the child, and a lock one of them held stays held.
        self._lock, self._write_lock = threading.Lock(), threading.Lock()
        self._pending, self._pending_bytes, self._flusher = [], 0, None


def _flush_all() -> None:
    for writer in list(_writers):
        writer.flush()


def _after_fork_in_child() -> None:
    for writer in list(_writers):
        writer._after_fork_in_child()


atexit.register(_flush_all)
os.register_at_fork(before=_flush_all, after_in_child=_after_fork_in_child)


class Logger:
    """A module's logger, bound once each time logging is configured (``configure_logging``).

    structlog's lazy proxy (``structlog.get_logger``) binds a new logger for every line, a
    third of what a line costs; this one keeps the logger it bound until logging is
    configured again. ``bind`` gives a structlog bound logger, for the lines of one step.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._bound: FilteringBoundLogger | None = None
        self._generation = -1

    def _logger(self) -> FilteringBoundLogger:
        bound = self._bound
        if bound is None or self._generation != _generation:
            bound = self._bound = structlog.get_logger(self.name).bind()
            self._generation = _generation
        return bound

    def bind(self, **values: Any) -> FilteringBoundLogger:
        return self._logger().bind(**values)

    def debug(self, event: str, **values: Any) -> None:
        self._logger().debug(event, **values)

    def info(self, event: str, **values: Any) -> None:
        self._logger().info(event, **values)

    def warning(self, event: str, **values: Any) -> None:
        self._logger().warning(event, **values)

    def error(self, event: str, **values: Any) -> None:
        self._logger().error(event, **values)

    def exception(self, event: str, **values: Any) -> None:
        self._logger().exception(event, **values)


def get_logger(name: str) -> Logger:
    """The logger a module keeps in ``log``."""
    return Logger(name)


# Bumped by configure_logging: each Logger binds again at its next line.
_generation = 0


class _WriterLogger:
    """The logger structlog's bound loggers hand rendered lines to: named, for add_logger_name."""

    def __init__(self, writer: LineWriter, name: str) -> None:
        self.name = name
        self._writer = writer

    def msg(self, line: str) -> None:  # both renderers return text
        self._writer.write(line)

    def urgent(self, line: str) -> None:
        self._writer.write(line, urgent=True)

    debug = info = log = msg
    warning = warn = error = critical = exception = fatal = urgent


class _WriterLoggerFactory:
    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer
        self._loggers: dict[str, _WriterLogger] = {}

    def __call__(self, *args: Any) -> _WriterLogger:
        name = args[0] if args and isinstance(args[0], str) else ""
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = _WriterLogger(self._writer, name)
        return logger


class _WriterHandler(logging.Handler):
    """The stdlib records' handler: formatted by the same processors, written by the same writer."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # stdlib handlers report a record they cannot format, and go on
            self.handleError(record)
            return
        self._writer.write(line, urgent=record.levelno >= logging.WARNING)


def uses_json(settings: Settings, stream: Any = None) -> bool:
    """Whether log lines on ``stream`` (stderr by default) are JSON."""
    stream = sys.stderr if stream is None else stream
    if settings.log_format == "json":
        return True
    if settings.log_format == "console":
        return False
    return not (hasattr(stream, "isatty") and stream.isatty())


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    """Route structlog and the stdlib loggers through one redacting pipeline."""
    stream = stream or sys.stderr
    redactor = Redactor(settings.redacted_values)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        _timestamp,
        structlog.stdlib.ExtraAdder(),
        hide_task_arguments,
        redactor,
    ]
    as_json = uses_json(settings, stream)
    render: list[Any] = []
    if as_json:
        render += [
            structlog.processors.format_exc_info,
            _ScrubRenderedExceptions(redactor),
            structlog.processors.JSONRenderer(serializer=_json_dumps),
        ]
    else:
        render += [
            structlog.dev.ConsoleRenderer(
                colors=hasattr(stream, "isatty") and stream.isatty(),
                exception_formatter=_scrubbed_traceback(redactor),
            )
        ]

    global _current  # noqa: PLW0603 - the process's one writer, replaced when logging is configured again
    if _current is not None:
        _current.close()
    writer = _current = LineWriter(stream)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared, processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render]
    )
    handler = _WriterHandler(writer)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # Python's warnings (Celery's SecurityWarning, deprecations) as log lines, not raw text.
    logging.captureWarnings(True)
    # httpx logs every request URL at INFO; the URL carries the API key. It is
    # redacted anyway, but one line per poll is noise at INFO.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for celery_logger in ("celery", "kombu"):
        logging.getLogger(celery_logger).propagate = True
    # Celery's "Task ... received" and "... succeeded in" lines come twice per task run,
    # and every step already logs what it did, with the job and the task id. They stay
    # at DEBUG; task failures (ERROR) are still logged.
    per_task_level = logging.DEBUG if root.level <= logging.DEBUG else max(logging.WARNING, root.level)
    for per_task in CELERY_PER_TASK_LOGGERS:
        logging.getLogger(per_task).setLevel(per_task_level)
    beat = logging.getLogger(CELERY_BEAT_LOGGER)
    if not any(isinstance(f, _RoutineAtDebug) for f in beat.filters):
        beat.addFilter(_RoutineAtDebug())

    structlog.configure(
        # ExtraAdder reads stdlib records only; our lines have no such record.
        processors=[p for p in shared if not isinstance(p, structlog.stdlib.ExtraAdder)] + render,
        logger_factory=_WriterLoggerFactory(writer),
        # Lines below the level are dropped before any processor runs.
        wrapper_class=structlog.make_filtering_bound_logger(root.level),
        # Not cached: a module's logger made before this call must follow it.
        cache_logger_on_first_use=False,
    )
    global _generation  # noqa: PLW0603 - module loggers bind again, under this configuration
    _generation += 1
