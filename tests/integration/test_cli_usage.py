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
