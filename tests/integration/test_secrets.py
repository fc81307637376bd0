"""The API key and the webhook secrets reach no log line and no Redis value, not even at debug level.

A system of its own runs, with LOG_LEVEL=debug, a completion, a refused API key and a
delivery that fails once, and failures whose exceptions carry the request (the API key
travels in the query string): Check365 dropping connections, answering too slowly,
garbage, 5xx and 429, Check365 unreachable until the watch times out, a receiver that
answers too slowly, one that refuses connections and one that fails until the event is
dead-lettered; and two endpoints of an endpoints file, one with its secret inline and one
with it in a ``secret_env`` variable, the first retried, the second dead-lettered. Then
every log line of its worker and beat processes, every command Redis received while it
ran (MONITOR), every value left in Redis (kombu's queued and unacked messages decoded
from their base64 envelope, the dead-letter records with their attempts) and what the
CLI prints about the dead letters and the jobs are searched for
each secret, plain and base64-encoded at any alignment.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from tests.support.cluster import Cluster, WorkerProcess, cli_command, new_api_key, new_secret, wait_until
from worker.intake.enqueue import enqueue_watch
from worker.local.receiver import Receiver
from worker.local.redisserver import free_port
from worker.local.simulator import FaultPlan, Simulator

pytestmark = pytest.mark.integration

TIMEOUT = 25.0
WRONG_KEY_QUEUE = "it-secrets-wrong-key"
FAULTS_QUEUE = "it-secrets-faults"
NO_API_QUEUE = "it-secrets-no-api"
# Short enough that a slow answer is a timeout, with its exception, within the test.
FAILING = {"WEBHOOK_TIMEOUT_S": "1", "CHECK365_TIMEOUT_S": "0.3"}
# Every fault whose handling goes through an exception: dropped, too slow, garbage, 5xx, 429...
# With this seed the first seven requests meet all of them, the eighth is answered.
FAULTS = FaultPlan(
    rate=0.6, kinds=("drop", "slow", "malformed", "5xx", "429", "success_false"), seed=61, slow_s=0.8, retry_after_s=0.2
)
# The jobs that end with every event delivered, and those whose event ends dead-lettered.
DELIVERED_JOBS = ("S-done", "S-refused", "S-retried", "S-faults", "S-no-api", "S-slow-receiver", "S-inline")
DEAD_JOBS = ("S-dead", "S-unreachable-receiver", "S-from-env")
# The endpoints' secrets: one written in the file, one in the variable its secret_env names.
INLINE_SECRET = new_secret()
ENV_SECRET = new_secret()
# What the endpoints' receiver recorded, by path (it stops when the flow's fixture ends).
ENDPOINT_RECEIVED: dict[str, list[Any]] = {}


def endpoint_env(cluster: Cluster) -> dict[str, str]:
    """What every process of the flow (and every CLI command) gets besides the cluster's environment."""
    return {"WEBHOOK_ENDPOINTS_FILE": str(cluster.directory / "endpoints.toml"), "S_ENDPOINT_SECRET": ENV_SECRET}


def write_endpoints_file(cluster: Cluster, receiver: Receiver) -> None:
    (cluster.directory / "endpoints.toml").write_text(
        f"""
[endpoints.inline]
url = "{receiver.url}/inline"
secret = "{INLINE_SECRET}"
allow_http = true
allow_private_networks = true

[endpoints.from-env]
url = "{receiver.url}/env"
secret_env = "S_ENDPOINT_SECRET"
allow_http = true
allow_private_networks = true
""",
        encoding="utf-8",
    )


def base64_forms(secret: str) -> list[bytes]:
    """What ``secret`` looks like inside any base64 text, whatever bytes precede it.

    Base64 encodes 3 bytes as 4 characters, so the text depends on the secret's offset
    modulo 3; the characters that mix in neighbouring bytes are cut off.
    """
    raw = secret.encode()
    forms = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        whole = (offset + len(raw)) // 3 * 4  # characters of complete 3-byte groups
        forms.append(encoded[(4 * offset + 2) // 3 : whole])
    return forms


def leaks(blob: bytes, secrets: dict[str, str]) -> list[str]:
    """The names of the secrets that ``blob`` contains, plainly or base64-encoded."""
    found = []
    for name, value in secrets.items():
        if value.encode() in blob or any(form in blob for form in base64_forms(value)):
            found.append(name)
    return found


def decoded_messages(value: bytes) -> list[bytes]:
    """The bodies of any kombu messages in ``value``: they are stored base64-encoded in JSON."""
    bodies: list[bytes] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            body = node.get("body")
            if isinstance(body, str) and node.get("properties", {}).get("body_encoding") == "base64":
                with contextlib.suppress(binascii.Error, ValueError):
                    bodies.append(base64.b64decode(body))
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    with contextlib.suppress(ValueError):
        walk(json.loads(value))
    return bodies


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def redis_values(client: redis.Redis) -> list[tuple[str, bytes]]:
    """(key, value) for every value of every key, whatever its type."""
    out: list[tuple[str, bytes]] = []
    for raw_key in client.scan_iter(count=1000):
        key = _bytes(raw_key).decode("utf-8", "replace")
        kind = _bytes(client.type(raw_key)).decode()
        values: list[object] = [raw_key]
        if kind == "string":
            values.append(client.get(raw_key))
        elif kind == "hash":
            for field, value in client.hgetall(raw_key).items():
                values += [field, value]
        elif kind == "list":
            values += client.lrange(raw_key, 0, -1)
        elif kind == "set":
            values += list(client.smembers(raw_key))
        elif kind == "zset":
            values += list(client.zrange(raw_key, 0, -1))
        elif kind == "stream":
            for _, entry in client.xrange(raw_key) or []:
                values += [item for pair in (entry or {}).items() for item in pair]
        for item in values:
            blob = _bytes(item)
            out.append((key, blob))
            out += [(f"{key} (decoded message)", body) for body in decoded_messages(blob)]
    return out


class CommandRecorder:
    """Every command Redis receives while it runs (MONITOR), with its arguments."""

    def __init__(self, url: str) -> None:
        # No read timeout (redis-py's default is 5 s): Redis may stay quiet longer than that
        # while the workers start on a loaded machine, and a timeout would end the recording.
        self._client = redis.Redis.from_url(url, socket_timeout=None)
        self._monitor = self._client.monitor()  # type: ignore[no-untyped-call]
        self._monitor.__enter__()
        self.commands: list[bytes] = []
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                command = self._monitor.next_command()
                self.commands.append(str(command.get("command", "")).encode())
        except (redis.ConnectionError, OSError, ValueError, AttributeError):
            return  # the connection was closed by stop()

    def stop(self) -> None:
        self._monitor.connection.disconnect()
        self._thread.join(5)
        self._client.close()


@pytest.fixture(scope="module")
def secret_flow() -> Iterator[tuple[Cluster, CommandRecorder, list[WorkerProcess], dict[str, str]]]:
    """A debug-level system that has run a completion, a refused key, a retried delivery and the failures above."""
    with (
        Cluster() as cluster,
        Simulator(cluster.api_key, faults=FAULTS) as faulty_api,
        Receiver([INLINE_SECRET, ENV_SECRET]) as endpoint_receiver,
    ):
        write_endpoints_file(cluster, endpoint_receiver)
        recorder = CommandRecorder(cluster.redis_url)
        wrong_key = new_api_key()
        debug = {"LOG_LEVEL": "debug", **FAILING, **endpoint_env(cluster)}
        processes = [
            cluster.start_worker("secrets-worker", concurrency=2, env_overrides=debug, wait=False),
            cluster.start_worker(
                "secrets-wrong-key",
                concurrency=1,
                queue=WRONG_KEY_QUEUE,
                # The refusal fails the watch once it has lasted this long.
                env_overrides={**debug, "CHECK365_API_KEY": wrong_key, "CHECK365_AUTH_GRACE_S": "0.5"},
                wait=False,
            ),
            cluster.start_worker(
                "secrets-faults",
                concurrency=1,
                queue=FAULTS_QUEUE,
                env_overrides={**debug, "CHECK365_BASE_URL": faulty_api.url},
                wait=False,
            ),
            cluster.start_worker(
                "secrets-no-api",
                concurrency=1,
                queue=NO_API_QUEUE,
                env_overrides={**debug, "CHECK365_BASE_URL": f"http://127.0.0.1:{free_port()}", "WATCH_TIMEOUT_S": "2"},
                wait=False,
            ),
            cluster.start_beat("secrets-beat", env_overrides=debug, wait=False),
        ]
        try:
            for process in processes:
                process.wait_ready()

            cluster.sim.add_job("S-done", size=3, duration_s=0.5)
            cluster.enqueue("S-done", "/hooks/S-done", {"flow": "completion"})
            cluster.sim.add_job("S-refused", size=3, duration_s=0.0)
            cluster.enqueue("S-refused", "/hooks/S-refused", CHECK365_QUEUE=WRONG_KEY_QUEUE)
            cluster.receiver.script("/hooks/S-retried", [500])
            cluster.sim.add_job("S-retried", size=3, duration_s=0.0)
            cluster.enqueue("S-retried", "/hooks/S-retried")
            faulty_api.add_job("S-faults", size=3, duration_s=1.0)
            cluster.enqueue("S-faults", "/hooks/S-faults", CHECK365_QUEUE=FAULTS_QUEUE)
            cluster.enqueue("S-no-api", "/hooks/S-no-api", CHECK365_QUEUE=NO_API_QUEUE)
            cluster.receiver.script("/hooks/S-slow-receiver", [(200, {}, 2.0)])
            cluster.sim.add_job("S-slow-receiver", size=3, duration_s=0.0)
            cluster.enqueue("S-slow-receiver", "/hooks/S-slow-receiver")
            cluster.receiver.default("/hooks/S-dead", 500)
            cluster.sim.add_job("S-dead", size=3, duration_s=0.0)
            cluster.enqueue("S-dead", "/hooks/S-dead")
            endpoint_receiver.script("/inline/S-inline", [500])
            endpoint_receiver.default("/env/S-from-env", 500)
            for job, path in (("S-inline", "/inline/S-inline"), ("S-from-env", "/env/S-from-env")):
                cluster.sim.add_job(job, size=3, duration_s=0.0)
                enqueue_watch(job, endpoint_receiver.url + path, settings=cluster.client_settings(**debug))
            cluster.sim.add_job("S-unreachable-receiver", size=3, duration_s=0.0)
            enqueue_watch(
                "S-unreachable-receiver",
                f"http://127.0.0.1:{free_port()}/hooks/S-unreachable-receiver",
                settings=cluster.client_settings(),
            )

            # The outbox records a delivery just after the receiver answered it.
            outbox = cluster.outbox()

            def ended(jobs: tuple[str, ...], state: str) -> bool:
                watches = [w for job in jobs for w in cluster.watch_state(job)]
                return len(watches) == len(jobs) and all(
                    w.events and all((e := outbox.get(i)) is not None and e.state == state for i in w.events)
                    for w in watches
                )

            wait_until(
                lambda: ended(DELIVERED_JOBS, "delivered") and ended(DEAD_JOBS, "dead"),
                TIMEOUT,
                "every event is recorded as delivered or dead-lettered",
            )
        finally:
            for process in processes:
                process.stop()
            recorder.stop()
        secrets = {
            "CHECK365_API_KEY": cluster.api_key,
            "the refused CHECK365_API_KEY": wrong_key,
            "WEBHOOK_SECRET": cluster.secret,
            "WEBHOOK_SECRET's key": cluster.secret.removeprefix("whsec_"),
            "the inline endpoint secret": INLINE_SECRET,
            "the inline endpoint secret's key": INLINE_SECRET.removeprefix("whsec_"),
            "the secret_env endpoint secret": ENV_SECRET,
            "the secret_env endpoint secret's key": ENV_SECRET.removeprefix("whsec_"),
        }
        # Read before the receiver stops.
        received = {path: endpoint_receiver.received(path) for path in ("/inline/S-inline", "/env/S-from-env")}
        ENDPOINT_RECEIVED.update(received)
        yield cluster, recorder, processes, secrets


def test_the_flow_ran_as_intended(
    secret_flow: tuple[Cluster, CommandRecorder, list[WorkerProcess], dict[str, str]],
) -> None:
    # Without this, a flow that silently did less would make the searches below pass vacuously.
    cluster, recorder, processes, _ = secret_flow
    (refused,) = list(cluster.receiver.received("/hooks/S-refused"))
    assert refused.verified and refused.json()["data"]["reason"] == "unauthorized"
    retried = cluster.receiver.received("/hooks/S-retried")
    assert [r.status_sent for r in retried] == [500, 200] and all(r.verified for r in retried)
    (done,) = cluster.receiver.received("/hooks/S-done")
    assert done.verified and done.json()["type"] == "bulk_validation.completed"
    for process in processes:
        assert any(r.get("level") == "debug" for r in process.log_records()), f"{process.name} logged no debug line"
    # MONITOR saw the broker messages being published, so the search below covers them.
    publishes = [c for c in recorder.commands if c.upper().startswith(b"LPUSH CHECK365 ")]
    assert any(b"check365.watch_bulk_job" in c for c in publishes), "no watch message seen by MONITOR"
    # The endpoints' events were signed with their own secrets, and retried or dead-lettered.
    inline, from_env = ENDPOINT_RECEIVED["/inline/S-inline"], ENDPOINT_RECEIVED["/env/S-from-env"]
    assert [r.status_sent for r in inline] == [500, 200] and all(r.verified for r in inline)
    assert len(from_env) > 1 and all(r.verified for r in from_env)


def test_the_failures_left_their_exception_texts_and_dead_letters(
    secret_flow: tuple[Cluster, CommandRecorder, list[WorkerProcess], dict[str, str]],
) -> None:
    # Without this, failures that silently did not happen would make the searches pass vacuously.
    cluster, _, processes, _ = secret_flow
    errors = " ".join(str(r.get("error")) for p in processes for r in p.log_records() if r.get("error"))
    for text in (
        "could not reach Check365 (RemoteProtocolError)",  # a dropped connection
        "Check365 did not answer in time (ReadTimeout)",
        "could not reach Check365 (ConnectError)",  # nothing listening
        "not Check365's JSON",  # the simulator's HTML page, answered with 200
        "Check365 answered HTTP 503",
        "Check365 answered HTTP 429",
        "timeout",  # the slow receiver
        "connection error (ConnectError)",  # the receiver refusing connections
    ):
        assert text in errors, f"no failure logged with {text!r}"
    (timed_out,) = cluster.receiver.received("/hooks/S-no-api")
    assert timed_out.json()["type"] == "bulk_validation.timed_out"
    assert len(cluster.receiver.received("/hooks/S-slow-receiver")) == 2
    dead = cluster.outbox().dead_letters()
    assert len(dead) == len(DEAD_JOBS)
    assert all(len(e.attempts) > 1 for e in (cluster.outbox().get(i) for i in dead) if e is not None)


def run_cli_side_by_side(cluster: Cluster, commands: list[list[str]]) -> list[tuple[list[str], int, str]]:
    """(arguments, exit code, everything printed) of each ``check365-worker`` command, a few at a time.

    As many at once as there are cores: twenty interpreters starting together on a loaded
    two-core machine took over a minute each.
    """

    def run(args: list[str]) -> tuple[list[str], int, str]:
        done = subprocess.run(
            [*cli_command(), *args],
            env=cluster.env(**endpoint_env(cluster)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
        return args, done.returncode, done.stdout

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(run, commands))


def test_no_dead_letter_record_or_cli_output_contains_a_secret(
    secret_flow: tuple[Cluster, CommandRecorder, list[WorkerProcess], dict[str, str]],
) -> None:
    cluster, _, _, secrets = secret_flow
    commands = [["dead-letters", "list"], ["dead-letters", "list", "--json"]]
    # The endpoints' tools name secrets by fingerprint only, and an error names no value.
    commands += [["endpoints"], ["endpoints", "--json"], ["endpoints", "recover", "from-env", "--since", "1h"]]
    commands += [["send-test", "--endpoint", "inline", "--json"], ["send-test", "--endpoint", "from-env"]]
    for webhook_id in cluster.outbox().dead_letters():
        commands += [["dead-letters", "show", webhook_id], ["dead-letters", "show", webhook_id, "--json"]]
    for job in (*DELIVERED_JOBS, *DEAD_JOBS):
        commands += [["status", job], ["status", job, "--json"]]
    outputs = run_cli_side_by_side(cluster, commands)
    assert all(code == 0 for _, code, _ in outputs), [(args, text) for args, code, text in outputs if code]
    assert any("attempt" in text for args, _, text in outputs if args[:2] == ["dead-letters", "show"])
    for args, _, text in outputs:
        found = leaks(text.encode(), secrets)
        assert not found, f"`check365-worker {' '.join(args)}` prints {found}"


def test_no_log_line_contains_a_secret(
    secret_flow: tuple[Cluster, CommandRecorder, list[WorkerProcess], dict[str, str]],
) -> None:
    _, _, processes, secrets = secret_flow
    for process in processes:
        for number, line in enumerate(process.log_text().splitlines(), start=1):
            found = leaks(line.encode(), secrets)
            assert not found, f"{process.name} log line {number} contains {found}"


def test_no_redis_command_carried_a_secret(
    secret_flow: tuple[Cluster, CommandRecorder, list[WorkerProcess], dict[str, str]],
) -> None:
    # Covers broker messages that were published and consumed while the flow ran.
    _, recorder, _, secrets = secret_flow
    assert recorder.commands
    for command in recorder.commands:
        found = leaks(command, secrets)
        assert not found, f"a Redis command contains {found}: {command[:300]!r}"


def test_no_redis_value_contains_a_secret(
    secret_flow: tuple[Cluster, CommandRecorder, list[WorkerProcess], dict[str, str]],
) -> None:
    cluster, _, _, secrets = secret_flow
    values = redis_values(cluster.redis())
    assert any(key.startswith("check365:watch:") for key, _ in values), "the watch state should be there"
    # The dead letters and their attempts are there to be searched too.
    assert any(key == "check365:dead" for key, _ in values)
    assert any(key.startswith("check365:event_attempts:") for key, _ in values)
    for key, value in values:
        found = leaks(value, secrets)
        assert not found, f"Redis key {key} holds {found}"
