"""The console script's own rules: usage errors, the errors it names, and one ``--json`` shape.

Each test runs the installed ``check365-worker`` as a user would. Those that need no
Redis point ``REDIS_URL`` at a port nothing listens on, so that reaching it would show.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from tests.support.cluster import PROJECT_VARIABLES, Cluster, cli_command, new_secret, wait_until
from worker.local.redisserver import free_port

pytestmark = pytest.mark.integration


def run(*args: str, stdout: int | None = subprocess.PIPE, **env: str) -> subprocess.CompletedProcess[str]:
    """``check365-worker ARGS`` with no project setting but a Redis URL nothing answers."""
    environ = {k: v for k, v in os.environ.items() if k not in PROJECT_VARIABLES}
    environ.update({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", **env})
    return subprocess.run(
        [*cli_command(), *args],
        env=environ,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def signed_request(tmp_path: Path, secret: str) -> tuple[Path, Path]:
    body = b'{"type":"bulk_validation.failed","data":{}}'
    stamp = int(time.time())
    signature = Webhook(secret).sign("msg_1", datetime.fromtimestamp(stamp, tz=UTC), body.decode())
    headers = tmp_path / "headers.json"
    headers.write_text(
        json.dumps({"webhook-id": "msg_1", "webhook-timestamp": str(stamp), "webhook-signature": signature})
    )
    (tmp_path / "body.json").write_bytes(body)
    return headers, tmp_path / "body.json"


# -- dead letters ------------------------------------------------------------------------------


def dead_letter(cluster: Cluster, job_id: str) -> str:
    """The webhook id of ``job_id``'s completed event, dead-lettered at once by a 410."""
    path = f"/hooks/{job_id}"
    cluster.receiver.default(path, 410)
    cluster.sim.add_job(job_id, size=1, duration_s=0.0)
    cluster.enqueue(job_id, path)
    outbox = cluster.outbox()

    def dead_id() -> str | None:
        for webhook_id in outbox.dead_letters():
            event = outbox.get(webhook_id)
            if event is not None and event.job_id == job_id:
                return webhook_id
        return None

    found: str = wait_until(dead_id, 25, f"a dead letter of {job_id}")
    return found


def test_replay_refuses_an_id_together_with_all_and_replays_nothing(cluster: Cluster, job_id: str) -> None:
    first, second = dead_letter(cluster, job_id + "-1"), dead_letter(cluster, job_id + "-2")

    result = cluster.cli("dead-letters", "replay", first, "--all")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "not both" in result.stderr
    outbox = cluster.outbox()
    assert {outbox.get(first).state, outbox.get(second).state} == {"dead"}  # type: ignore[union-attr]


def test_show_without_an_id_is_a_usage_error() -> None:
    result = run("dead-letters", "show")
    assert result.returncode == 2
    assert "dead-letters show needs a WEBHOOK_ID" in result.stderr
    assert "Redis" not in result.stderr


# -- errors are named for what failed --------------------------------------------------------


def test_a_missing_headers_file_is_named_not_blamed_on_redis(tmp_path: Path) -> None:
    (tmp_path / "body.json").write_bytes(b"{}")
    result = run(
        "verify",
        "--headers",
        str(tmp_path / "missing.txt"),
        "--body",
        str(tmp_path / "body.json"),
        "--secret",
        new_secret(),
    )
    assert result.returncode == 2
    assert "cannot read the --headers file" in result.stderr
    assert "missing.txt: No such file or directory" in result.stderr
    assert "Redis" not in result.stderr


def test_simulate_on_a_busy_port_says_so() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("simulate", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Redis" not in result.stderr


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    secret = new_secret()
    headers, body = signed_request(tmp_path, secret)
    read, write = os.pipe()
    os.close(read)  # like ``| head`` that has read all it wanted
    try:
        result = run("verify", "--headers", str(headers), "--body", str(body), "--secret", secret, stdout=write)
    finally:
        os.close(write)
    assert result.stderr == ""
    assert result.returncode == 141


# -- simulate's options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--fault-rate", "2", "between 0 and 1"),
        ("--fault-rate", "nan", "finite"),
        ("--fault-kinds", "bogus", "unknown fault kind ('bogus')"),
        ("--slow-s", "-1", "0 or more seconds"),
        ("--retry-after-s", "-0.5", "0 or more seconds"),
        ("--port", "70000", "a port from 0 to 65535"),
    ],
)
def test_simulate_refuses_bad_options_as_usage_errors(option: str, value: str, message: str) -> None:
    result = run("simulate", option, value, "--fault-rate", "0.5" if option != "--fault-rate" else value)
    assert result.returncode == 2, result.stderr
    assert f"argument {option}" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_every_simulate_option_has_help_text() -> None:
    result = run("simulate", "--help")
    assert result.returncode == 0
    options = (
        "--host",
        "--port",
        "--api-key",
        "--fault-rate",
        "--fault-kinds",
        "--seed",
        "--slow-s",
        "--retry-after-s",
    )
    lines = result.stdout.splitlines()
    for option in options:
        [index] = [n for n, line in enumerate(lines) if re.match(rf"\s+{option}\b", line)]
        described = re.match(rf"\s+{option}( [A-Z_]+)?\s{{2,}}\S", lines[index]) or re.match(
            r"\s{10,}\S", lines[index + 1]
        )
        assert described, f"{option} has no help text:\n{result.stdout}"


# -- verify ----------------------------------------------------------------------------------


def test_verify_takes_json(tmp_path: Path) -> None:
    secret = new_secret()
    headers, body = signed_request(tmp_path, secret)

    valid = run("verify", "--headers", str(headers), "--body", str(body), "--json", WEBHOOK_SECRET=secret)
    assert valid.returncode == 0, valid.stderr
    assert json.loads(valid.stdout) == {"valid": True, "webhook_id": "msg_1", "reason": None}

    invalid = run("verify", "--headers", str(headers), "--body", str(body), "--json", WEBHOOK_SECRET=new_secret())
    assert invalid.returncode == 1
    report = json.loads(invalid.stdout)
    assert report["valid"] is False
    assert "no v1 signature matches" in report["reason"]


def test_a_bad_secret_option_is_blamed_on_the_option(tmp_path: Path) -> None:
    headers, body = signed_request(tmp_path, new_secret())
    result = run(
        "verify", "--headers", str(headers), "--body", str(body), "--secret", "nope", WEBHOOK_SECRET=new_secret()
    )
    assert result.returncode == 2
    assert "--secret is not usable" in result.stderr
    assert "WEBHOOK_SECRET" not in result.stderr
    assert "nope" not in result.stderr


# -- one --json shape --------------------------------------------------------------------------

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TIME_KEYS = {"at", "started_at", "deadline", "next_poll", "finished_at", "created_at", "next_attempt"}


def cli_json(cluster: Cluster, *args: str) -> Any:
    result = cluster.cli(*args, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def assert_one_shape(value: Any, where: str = "") -> int:
    """Every time is ISO 8601 UTC with milliseconds, every part an object; the number of times seen."""
    seen = 0
    if isinstance(value, dict):
        for key, item in value.items():
            if key in TIME_KEYS and item is not None:
                assert isinstance(item, str) and ISO_UTC.fullmatch(item), f"{where}.{key} = {item!r}"
                seen += 1
            elif key == "part":
                assert isinstance(item, dict) and set(item) == {"index", "count"}, f"{where}.part = {item!r}"
            else:
                seen += assert_one_shape(item, f"{where}.{key}")
    elif isinstance(value, list):
        seen += sum(assert_one_shape(item, f"{where}[{n}]") for n, item in enumerate(value))
    elif isinstance(value, float):
        assert value < 1e9, f"{where} looks like epoch seconds: {value}"
    return seen


def test_json_output_has_one_shape(cluster: Cluster, job_id: str) -> None:
    dead = dead_letter(cluster, job_id)
    running = job_id + "-running"
    cluster.sim.add_job(running, size=1, duration_s=3600, behaviour="never")
    cluster.enqueue(running, f"/hooks/{running}")
    wait_until(lambda: any(w.polls >= 1 for w in cluster.watch_state(running)), 25, "a first poll")

    outputs = {
        "status": cli_json(cluster, "status", job_id),
        "status (running)": cli_json(cluster, "status", running),
        "watches": cli_json(cluster, "watches", "--job", running),
        "dead-letters list": [r for r in cli_json(cluster, "dead-letters", "list") if r["webhook_id"] == dead],
        "dead-letters show": cli_json(cluster, "dead-letters", "show", dead),
    }
    for name, output in outputs.items():
        assert output, name
        assert assert_one_shape(output, name) or name == "dead-letters list", f"{name} shows no time"
    [watch] = outputs["status"]
    assert watch["events"][0]["part"] == {"index": 1, "count": 1}
    assert watch["events"][0]["attempts"][0]["at"] >= watch["started_at"]
    assert outputs["dead-letters show"]["part"] == {"index": 1, "count": 1}
    cluster.cli("cancel", running)


def test_enqueue_json_reports_an_error_as_json() -> None:
    result = run("enqueue", "J-1", "https://hooks.example.com/x", "--metadata", "[1]", "--json")
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "invalid_request"
    assert error["field"] == "metadata"
    assert "must be a JSON object" in error["message"]


@pytest.mark.parametrize(("metadata", "named"), [('{"a": NaN}', "NaN"), ('{"a": [-Infinity]}', "Infinity")])
def test_enqueue_names_nan_and_infinity_in_metadata(metadata: str, named: str) -> None:
    result = run("enqueue", "J-1", "https://hooks.example.com/x", "--metadata", metadata)
    assert result.returncode == 2
    assert "must not contain NaN or Infinity" in result.stderr
    assert named in result.stderr
    assert "JSON-serializable" not in result.stderr


def test_replaying_a_delivered_event_says_why_nothing_happened(cluster: Cluster, job_id: str) -> None:
    path = f"/hooks/{job_id}"
    cluster.sim.add_job(job_id, size=1, duration_s=0.0)
    cluster.enqueue(job_id, path)
    cluster.receiver.wait_for(lambda rx: any(r.path == path for r in rx), 25)
    webhook_id = cluster.receiver.received(path)[0].headers["webhook-id"]
    outbox = cluster.outbox()
    wait_until(lambda: getattr(outbox.get(webhook_id), "state", None) == "delivered", 25, "delivered")

    as_json = cluster.cli("dead-letters", "replay", webhook_id, "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {
        "replayed": [],
        "not_replayed": [{"webhook_id": webhook_id, "reason": "already delivered: nothing to replay"}],
    }
    plain = cluster.cli("dead-letters", "replay", webhook_id)
    assert f"{webhook_id} not replayed: already delivered" in plain.stdout


# -- status shows Check365's text safely -----------------------------------------------------


def test_status_escapes_control_characters_from_check365(cluster: Cluster, job_id: str) -> None:
    cluster.sim.add_job(job_id, size=1, duration_s=3600, behaviour="never")
    cluster.enqueue(job_id, f"/hooks/{job_id}")
    wait_until(lambda: any(w.polls >= 1 for w in cluster.watch_state(job_id)), 25, "a first poll")
    [watch] = cluster.watch_state(job_id)
    assert cluster.cli("cancel", job_id).returncode == 0  # no poll overwrites what is stored below
    # What a poll stores from an answer whose status clears the screen and rings the bell.
    hostile = "\x1b[2J\x1b]0;pwned\x07processing\r\n"
    cluster.redis().hset(cluster.watches().items.key(watch.watch_id), "last_status", hostile)

    text = cluster.cli("status", job_id)
    assert text.returncode == 0, text.stderr
    assert not any(c in text.stdout for c in "\x1b\x07\r")
    assert "last status \\x1b[2J\\x1b]0;pwned\\x07processing\\r\\n" in text.stdout
    [shown] = cli_json(cluster, "status", job_id)
    assert shown["last_status"] == hostile, "JSON carries the value itself, escaped by JSON"
