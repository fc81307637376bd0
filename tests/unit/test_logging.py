"""One redacting pipeline for our logs, Celery's and httpx's."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import celery
import pytest
import structlog
from celery import states
from celery.app.trace import TraceInfo
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer

from tests.support.settings import make_settings
from worker.runtime import logs
from worker.runtime.logs import CELERY_PER_TASK_LOGGERS, Redactor, configure_logging, get_logger

SECRET = "whsec_" + base64.b64encode(b"q" * 24).decode()
API_KEY = "live-key-0123456789"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    tuned = {name: logging.getLogger(name).level for name in (*CELERY_PER_TASK_LOGGERS, "httpx", "httpcore")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in tuned.items():
        logging.getLogger(name).setLevel(old)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def configured(fmt: str = "json", level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    settings = make_settings(CHECK365_API_KEY=API_KEY, WEBHOOK_SECRET=SECRET, LOG_FORMAT=fmt, LOG_LEVEL=level)
    configure_logging(settings, stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_structlog_lines_are_json_with_bound_context() -> None:
    stream = configured()
    structlog.contextvars.bind_contextvars(job_id="J-1", task_id="t-1", attempt=2)
    structlog.get_logger("check365.test").info("poll_done", status="processing", progress=40)
    [line] = lines(stream)
    assert line["event"] == "poll_done"
    assert (line["job_id"], line["task_id"], line["attempt"]) == ("J-1", "t-1", 2)
    assert line["level"] == "info"
    # UTC to the microsecond, as structlog's ISO TimeStamper writes it.
    before = datetime.now(tz=UTC)
    structlog.get_logger("check365.test").info("poll_done")
    stamp = str(lines(stream)[-1]["timestamp"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= at <= datetime.now(tz=UTC)


def test_stdlib_loggers_go_through_the_same_pipeline() -> None:
    stream = configured()
    structlog.contextvars.bind_contextvars(job_id="J-2")
    logging.getLogger("celery.worker.strategy").warning("Received task: %s", "check365.watch_bulk_job")
    [line] = lines(stream)
    assert line["event"] == "Received task: check365.watch_bulk_job"
    assert line["logger"] == "celery.worker.strategy"
    assert line["job_id"] == "J-2"


def test_secrets_are_scrubbed_wherever_they_appear() -> None:
    stream = configured()
    log = structlog.get_logger("check365.test")
    log.info("poll_failed", url=f"https://api.check365.io/x?api_key={API_KEY}&job_id=J", note=SECRET)
    logging.getLogger("httpx").warning("HTTP Request: GET https://h/x?job_id=J&api_key=%s", "other-key-xyz")
    try:
        raise RuntimeError(f"boom with {API_KEY}")
    except RuntimeError:
        log.exception("poll_crashed")
    text = stream.getvalue()
    assert API_KEY not in text
    assert SECRET not in text
    assert SECRET.removeprefix("whsec_") not in text
    assert "other-key-xyz" not in text
    assert text.count("***") >= 4


def test_the_key_as_a_url_carries_it_is_scrubbed_too() -> None:
    stream = io.StringIO()
    odd_key = "ck365/live+9fQ2xZrT7wLmB4vK=="
    settings = make_settings(CHECK365_API_KEY=odd_key, WEBHOOK_SECRET=SECRET, LOG_FORMAT="json")
    configure_logging(settings, stream=stream)
    structlog.get_logger("check365.test").warning(
        "poll_failed",
        error="Unknown key 'ck365%2Flive%2B9fQ2xZrT7wLmB4vK%3D%3D'",
        other="ck365%2flive%2b9fQ2xZrT7wLmB4vK%3d%3d",
    )
    [line] = lines(stream)
    assert line["error"] == "Unknown key '***'"
    assert line["other"] == "***"


def test_console_tracebacks_are_scrubbed() -> None:
    # The console renders the traceback after the redactor has run over the event.
    stream = configured(fmt="console")
    try:
        raise RuntimeError(f"boom with {API_KEY}")
    except RuntimeError:
        structlog.get_logger("check365.test").exception("poll_crashed")
    text = stream.getvalue()
    assert "RuntimeError: boom with ***" in text
    assert API_KEY not in text


def test_httpx_request_lines_are_quiet_at_info() -> None:
    stream = configured(level="info")
    logging.getLogger("httpx").info("HTTP Request: GET https://h/?api_key=k")
    assert stream.getvalue() == ""


CELERY_SUCCEEDED = "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"
CELERY_ARGS = {"name": "check365.watch_bulk_job", "id": "t-9", "runtime": 0.01, "return_value": "'completed'"}


def test_celerys_per_task_lines_are_debug_but_task_failures_are_not() -> None:
    stream = configured(level="info")
    logging.getLogger("celery.worker.strategy").info("Task %s[%s] received", "check365.watch_bulk_job", "t-9")
    logging.getLogger("celery.app.trace").info(CELERY_SUCCEEDED, CELERY_ARGS)
    logging.getLogger("celery.app.trace").error("Task %s[%s] raised unexpected: %r", "n", "t-9", ValueError("x"))
    [line] = lines(stream)
    assert line["level"] == "error"
    assert line["event"].startswith("Task n[t-9] raised unexpected")


def test_celerys_per_task_lines_show_at_debug() -> None:
    stream = configured(level="debug")
    logging.getLogger("celery.worker.strategy").info("Task %s[%s] received", "check365.watch_bulk_job", "t-9")
    logging.getLogger("celery.app.trace").info(CELERY_SUCCEEDED, CELERY_ARGS)
    assert [line["logger"] for line in lines(stream)] == list(CELERY_PER_TASK_LOGGERS)


# A producer's callback URL with its receiver's token, and its metadata: neither belongs in a log.
TASK_KWARGS = {
    "job_id": "J-7",
    "callback_url": "https://hooks.example.com/check365?token=rcv-token-4242",
    "metadata": {"customer": "private-name-7"},
}


def assert_no_task_arguments(output: str) -> None:
    assert "rcv-token-4242" not in output
    assert "private-name-7" not in output


def test_a_failed_task_is_logged_without_its_arguments() -> None:
    stream = configured(level="debug")
    app = celery.Celery("logging-test", set_as_current=False)

    @app.task(name="check365.watch_bulk_job", bind=True)  # type: ignore[untyped-decorator]
    def watch(self: object, **kwargs: object) -> None:
        raise AssertionError("never run")

    watch.push_request(id="t-10", args=[], kwargs=TASK_KWARGS, hostname="w1")
    try:
        raise RuntimeError("redis went away")
    except RuntimeError as exc:
        # Celery's own failure path, as the worker's tracer runs it.
        TraceInfo(states.FAILURE, exc).handle_failure(watch, watch.request, store_errors=False, call_errbacks=False)
    finally:
        watch.pop_request()

    [failure] = [line for line in lines(stream) if line["level"] == "error"]
    assert failure["event"] == "Task check365.watch_bulk_job[t-10] raised unexpected: RuntimeError('redis went away')"
    assert failure["data"]["kwargs"] == "***"  # type: ignore[index]
    assert_no_task_arguments(stream.getvalue())


class _Hashable(SimpleNamespace):
    """A stand-in for kombu's Message or Celery's consumer, hashable like them: Celery's
    signals look their senders up (once a receiver is connected, as the boundary's are)."""

    __hash__ = object.__hash__


def test_a_refused_message_is_logged_with_its_reason_but_not_its_contents() -> None:
    stream = configured()
    body = [[], TASK_KWARGS, {}]
    message = _Hashable(
        body=json.dumps(body).encode(),
        # What a producer's send_task puts in the headers.
        headers={"task": "check365.watch_bulk_job", "kwargsrepr": repr(TASK_KWARGS)},
        content_type="application/json",
        content_encoding="utf-8",
        reject_log_error=lambda *args: None,
        ack=lambda: None,
    )
    consumer = _Hashable(connection_errors=())
    # Celery's consumer, as it meets a message it cannot run or cannot decode.
    Consumer.on_invalid_task(consumer, body, message, InvalidTaskError("the body's options must be an object"))
    Consumer.on_decode_error(consumer, message, ValueError("bad utf-8"))

    # Celery's own lines (the boundary's watch_rejected lines, there once it is imported, say the same).
    invalid, undecodable = [r for r in lines(stream) if r["event"] not in ("watch_rejected", "delivery_rejected")]
    assert invalid["event"] == (
        "Received invalid task message: the body's options must be an object (the message's contents are not logged)"
    )
    assert undecodable["event"] == (
        "Can't decode message body: ValueError('bad utf-8') (the message's contents are not logged)"
    )
    assert_no_task_arguments(stream.getvalue())


def test_lines_below_the_level_are_dropped() -> None:
    stream = configured(level="warning")
    structlog.get_logger("check365.test").info("poll_done")
    structlog.get_logger("check365.test").warning("poll_failed", error="timeout")
    assert [line["event"] for line in lines(stream)] == ["poll_failed"]


def test_odd_values_still_render_as_json() -> None:
    stream = configured()
    structlog.get_logger("check365.test").info("watch_enqueued", when=object(), ratio=0.5, tags=("a", 1))
    [line] = lines(stream)
    assert line["ratio"] == 0.5
    assert line["tags"] == ["a", 1]
    assert str(line["when"]).startswith("<object object")


def test_strings_that_are_not_utf8_still_render() -> None:
    stream = configured()
    structlog.get_logger("check365.test").warning("watch_rejected", reason="job_id 'J-\u202e\ud800' is odd")
    [line] = lines(stream)
    assert line["reason"] == "job_id 'J-\u202e\ud800' is odd"


def test_console_format_is_readable_text() -> None:
    stream = configured(fmt="console")
    structlog.get_logger("check365.test").info("watch_enqueued", job_id="J-3")
    text = stream.getvalue()
    assert "watch_enqueued" in text
    assert "J-3" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_auto_format_is_json_off_a_terminal() -> None:
    stream = configured(fmt="auto")
    structlog.get_logger("check365.test").info("watch_enqueued")
    assert lines(stream)[0]["event"] == "watch_enqueued"


def test_redactor_leaves_ordinary_text_alone() -> None:
    redactor = Redactor([API_KEY])
    assert redactor.scrub("job J-1 completed") == "job J-1 completed"
    assert redactor.scrub(f"a{API_KEY}b") == "a***b"


def test_beats_line_per_sent_task_is_at_debug_like_the_workers() -> None:
    stream = configured(level="info")
    beat = logging.getLogger("celery.beat")
    beat.info("Scheduler: Sending due task %s (%s)", "check365-sweep", "check365.sweep")
    beat.info("beat: Starting...")
    beat.error("Message Error: %s", "broker gone")
    assert [line["event"] for line in lines(stream)] == ["beat: Starting...", "Message Error: broker gone"]

    stream = configured(level="debug")
    logging.getLogger("celery.beat").info("Scheduler: Sending due task %s (%s)", "check365-sweep", "check365.sweep")
    [line] = lines(stream)
    assert line["level"] == "debug"
    assert str(line["event"]).startswith("Scheduler: Sending due task check365-sweep")


def test_lines_written_at_once_from_many_threads_stay_whole(tmp_path: Path) -> None:
    # A stream with a file descriptor (a worker's stderr) is written with one os.write per line.
    with (tmp_path / "worker.err").open("w") as out:
        settings = make_settings(CHECK365_API_KEY=API_KEY, WEBHOOK_SECRET=SECRET, LOG_FORMAT="json", LOG_LEVEL="info")
        configure_logging(settings, stream=out)
        filler = "x" * 3000  # lines of a few kilobytes, like a quoted Check365 message

        def log_lines(n: int) -> None:
            for i in range(50):
                structlog.get_logger("check365.test").info("poll_done", thread=n, line=i, filler=filler)
                logging.getLogger("celery.worker").warning("stdlib %d/%d", n, i)

        threads = [threading.Thread(target=log_lines, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    records = [json.loads(line) for line in (tmp_path / "worker.err").read_text().splitlines()]
    assert len(records) == 16 * 50 * 2
    assert sum(r["event"] == "poll_done" and r["filler"] == filler for r in records) == 16 * 50
    assert sum(str(r["event"]).startswith("stdlib ") for r in records) == 16 * 50


def test_a_closed_log_stream_does_not_fail_the_caller(tmp_path: Path) -> None:
    out = (tmp_path / "worker.err").open("w")
    configure_logging(make_settings(LOG_FORMAT="json", LOG_LEVEL="info"), stream=out)
    os.close(out.fileno())  # the reading end of a pipe gone, a full disk: the write fails
    structlog.get_logger("check365.test").info("poll_done")
    logging.getLogger("celery.worker").warning("still running")
    with contextlib.suppress(OSError):
        out.close()


def test_a_modules_logger_binds_once_and_follows_a_new_configuration() -> None:
    log = get_logger("check365.test")
    first = configured()
    log.info("poll_done", line=1)
    bound = log._logger()
    assert log._logger() is bound  # one bound logger for every line, not one per line
    second = configured()
    log.info("poll_done", line=2)
    assert log._logger() is not bound
    assert [r["line"] for r in lines(first)] == [1]
    assert [r["line"] for r in lines(second)] == [2]
    assert lines(second)[0]["logger"] == "check365.test"


def test_a_secret_among_many_plain_values_is_still_scrubbed() -> None:
    stream = configured()
    get_logger("check365.test").info(
        "poll_done", job_id="J-1", polls=3, done=True, progress=None, reason=f"refused {API_KEY} twice", ratio=0.5
    )
    [line] = lines(stream)
    assert API_KEY not in json.dumps(line)
    assert line["reason"] == "refused *** twice"
    assert line["job_id"] == "J-1" and line["polls"] == 3 and line["done"] is True


def _configured_on(fd: int) -> None:
    out = os.fdopen(fd, "w", closefd=False)
    configure_logging(make_settings(LOG_FORMAT="json", LOG_LEVEL="info"), stream=out)


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


@pytest.fixture
def log_pipe() -> Iterator[int]:
    """The reading end of a pipe that logging writes to (configured with JSON lines at INFO)."""
    read, write = os.pipe()
    try:
        _configured_on(write)
        yield read
    finally:
        os.close(read)
        os.close(write)


def test_lines_to_a_pipe_are_written_together_and_a_warning_writes_them_at_once(
    monkeypatch: pytest.MonkeyPatch, log_pipe: int
) -> None:
    monkeypatch.setattr(logs, "FLUSH_INTERVAL_S", 3600.0)
    for i in range(10):
        get_logger("check365.test").info("poll_done", line=i)
    assert not _readable(log_pipe, 0.2)  # held: one write for many lines
    logging.getLogger("celery.worker").warning("worth seeing now")
    assert _readable(log_pipe, 5.0)
    records = [json.loads(line) for line in os.read(log_pipe, 1 << 20).decode().splitlines()]
    assert [r.get("line") for r in records[:10]] == list(range(10))
    assert records[10]["event"] == "worth seeing now"


def test_lines_to_a_pipe_are_written_within_the_interval_without_anything_else(
    monkeypatch: pytest.MonkeyPatch, log_pipe: int
) -> None:
    monkeypatch.setattr(logs, "FLUSH_INTERVAL_S", 0.01)
    get_logger("check365.test").info("poll_done")
    assert _readable(log_pipe, 10.0)
    assert json.loads(os.read(log_pipe, 1 << 20))["event"] == "poll_done"


def test_a_terminal_gets_each_line_as_it_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "FLUSH_INTERVAL_S", 3600.0)
    parent, child = os.openpty()
    try:
        _configured_on(child)
        get_logger("check365.test").info("poll_done")
        assert _readable(parent, 10.0)
        assert b"poll_done" in os.read(parent, 1 << 20)
    finally:
        os.close(parent)
        os.close(child)


def test_lines_still_held_are_written_at_exit_and_a_forked_child_does_not_repeat_them() -> None:
    script = """
import os, sys
from tests.support.settings import make_settings
from worker.runtime import logs
logs.FLUSH_INTERVAL_S = 3600.0
logs.configure_logging(make_settings(LOG_FORMAT="json", LOG_LEVEL="info"), stream=sys.stdout)
log = logs.get_logger("check365.test")
log.info("before_fork")
pid = os.fork()
if pid == 0:
    log.info("in_child")
    logs._flush_all()  # as the child's exit would
    os._exit(0)
os.waitpid(pid, 0)
log.info("after_fork")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, cwd=Path.cwd()
    )
    events = [json.loads(line)["event"] for line in done.stdout.splitlines()]
    assert events == ["before_fork", "in_child", "after_fork"]
