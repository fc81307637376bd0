"""A whole check365-worker system on this machine: Redis, Check365, a receiver, workers, beat.

``Cluster`` owns a private Redis server, the Check365 simulator and a webhook receiver
that verifies every signature with the independent ``standardwebhooks`` package. Workers
and beat run as real ``celery`` subprocesses, each in its own session so that stopping
one stops its pool children too. Everything listens on 127.0.0.1 and everything a
cluster started is stopped by ``close()``, also after a failure.

Typical use::

    with Cluster() as cluster:
        worker = cluster.start_worker("w1")
        cluster.start_beat()
        cluster.sim.add_job("J-1", size=3, duration_s=1)
        cluster.enqueue("J-1", "/hooks/J-1")
        cluster.receiver.wait_for(lambda rx: ..., timeout=20)
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from tests.support.settings import make_settings
from worker.intake.enqueue import enqueue_watch
from worker.local.httpserver import NO_LATENCY, Latency
from worker.local.receiver import Receiver
from worker.local.redisserver import LocalRedis
from worker.local.simulator import Simulator
from worker.runtime.celeryconfig import WATCH_TASK, delivery_queue
from worker.settings import VARIABLES, Settings
from worker.state.outbox import Outbox
from worker.state.watches import Watch, WatchStore

DEFAULT_QUEUE = "check365"

# Where kombu's Redis transport keeps reserved messages (its defaults, which this project keeps):
# the messages by delivery tag, their reservation times, and the lock of its restore sweep.
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
KOMBU_UNACKED_MUTEX = "unacked_mutex"

# Every variable the project reads. They are dropped from the inherited environment
# so that a developer's shell (or a CI job) cannot change what a test runs against.
PROJECT_VARIABLES = (*VARIABLES, "REMAP_SIGTERM")

# Sub-second values so that a whole flow (polls, retries, sweeps) takes seconds.
FAST_SETTINGS: Mapping[str, str] = {
    "WEBHOOK_ALLOW_HTTP": "true",
    "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
    "POLL_INITIAL_DELAY_S": "0.2",
    "POLL_MAX_DELAY_S": "1",
    "WATCH_TIMEOUT_S": "20",
    "WEBHOOK_RETRY_DELAYS_S": "0.3,0.3,0.3",
    "SWEEP_INTERVAL_S": "1",
    "REARM_GRACE_S": "3",
    # The simulator is local: the pool-wide rate limit must never be what a test waits on.
    "CHECK365_MAX_RPS": "200",
    # The cluster's one receiver stands for many: every test's callbacks share its port, which
    # is one endpoint. A test's scripted failures must not open the breaker for the others;
    # the tests of isolation set their own threshold, with receivers of their own.
    "WEBHOOK_BREAKER_THRESHOLD": "1000000",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "info",
}

# Error-level lines the worker writes on purpose: the deployment needs an operator (a wrong
# CHECK365_BASE_URL, a refused API key). Every other error-level line is a crash.
OPERATOR_ALERTS = frozenset({"poll_misconfigured", "poll_key_refused"})

# Celery logs "<hostname> ready." once the worker consumes; beat logs this when it starts.
WORKER_READY = "ready."
BEAT_READY = "beat: Starting..."


def new_secret() -> str:
    """A fresh Standard Webhooks secret: whsec_ and a base64 key of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def new_api_key() -> str:
    return "key-" + secrets.token_hex(16)


def cli_command() -> list[str]:
    """The installed ``check365-worker`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("check365-worker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker.ops.cli"]


def _read(path: Path) -> str:
    # Empty once the cluster's directory is gone: a report written after teardown must not crash.
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


class WorkerProcess:
    """A ``celery`` subprocess in its own session, with its output kept in files."""

    def __init__(
        self, name: str, args: Sequence[str], env: Mapping[str, str], directory: Path, ready_marker: str
    ) -> None:
        self.name = name
        self.args = list(args)
        self.ready_marker = ready_marker
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            # A new session makes the process the leader of its own group, so that
            # killing the group also reaches the prefork pool's children.
            self.popen = subprocess.Popen(
                self.args,
                env=dict(env),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    # output

    def stdout_text(self) -> str:
        return _read(self.stdout_path)

    def stderr_text(self) -> str:
        return _read(self.stderr_path)

    def log_text(self) -> str:
        """Everything the process wrote; the structured log lines go to stderr."""
        return self.stderr_text() + self.stdout_text()

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (LOG_FORMAT=json) as objects; other lines are skipped."""
        records = []
        for raw_line in self.log_text().splitlines():
            line = raw_line.strip()
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill, or a banner that happens to start with a brace
            if isinstance(record, dict):
                records.append(record)
        return records

    def group_pids(self) -> list[int]:
        """The process and its pool children (its process group), from /proc (Linux)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # The command name may hold spaces and parentheses: fields follow the last ')'.
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[2]) == self.popen.pid:  # fields: state, ppid, pgrp, ...
                pids.append(int(stat.parent.name))
        return pids

    def local_tcp_ports(self) -> set[int]:
        """The local ports of the TCP connections the process group has open (Linux).

        A server sees these as its clients' ports, so a test can tell which worker sent
        a request (see ``Received.client_port``).
        """
        inodes: set[str] = set()
        for pid in self.group_pids():
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        target = os.readlink(fd)
                        if target.startswith("socket:["):
                            inodes.add(target[len("socket:[") : -1])
        ports: set[int] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[9] in inodes:  # fields: sl, local, remote, st, queues, tr, retrnsmt, uid, timeout, inode
                        ports.add(int(fields[1].rpartition(":")[2], 16))
        return ports

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # waiting

    def wait_for_log(self, predicate: Callable[[str], bool] | str, timeout: float) -> str:
        """The log text once ``predicate`` (or "contains this text") holds for it."""
        check = (lambda text: predicate in text) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if check(text):
                return text
            if not self.alive:
                raise RuntimeError(f"{self.name} exited with {self.returncode}; its log ends:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: the log condition did not hold within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.05)

    def wait_for_record(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first JSON log record matching ``predicate``, once it has been written."""
        found: list[dict[str, Any]] = []

        def check(_: str) -> bool:
            found[:] = [r for r in self.log_records() if predicate(r)]
            return bool(found)

        self.wait_for_log(check, timeout)
        return found[0]

    def wait_for_task_record(self, task_id: str, event: str, timeout: float) -> dict[str, Any]:
        """The first record of Celery task ``task_id`` whose event text contains ``event``."""
        return self.wait_for_record(lambda r: r.get("task_id") == task_id and event in str(r.get("event", "")), timeout)

    def wait_ready(self, timeout: float = 30.0) -> WorkerProcess:
        """Wait for the ready line (needs LOG_LEVEL info or debug: the line is logged at INFO).

        Much quicker than ``celery inspect ping``, which spends a second or more per call.
        """
        self.wait_for_log(self.ready_marker, timeout)
        return self

    def wait_exit(self, timeout: float) -> int:
        """The exit code; the process group is killed if it has not exited in time."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    # stopping

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the main process only, as a container runtime does to its PID 1."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.popen.pid, sig)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` to the process group and wait; SIGKILL the group if it lingers."""
        if self.alive:
            self._signal_group(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group: what a crash of the host looks like."""
        # The group is signalled even when the leader is gone: pool children may outlive it.
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


class Cluster:
    """Redis, the Check365 simulator and a verifying receiver, plus any workers and beat started."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        api_key: str | None = None,
        secret: str | None = None,
        appendonly: bool = False,
        api_latency: Latency = NO_LATENCY,
        receiver_latency: Latency = NO_LATENCY,
    ) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="check365-cluster-")
        self.directory = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.api_key = api_key or new_api_key()
        self.secret = secret or new_secret()
        # ``appendonly`` gives Redis an AOF (fsync always), so that ``redis_server.restart()``
        # (SIGKILL, then a new server on the same port) keeps every write, as in production.
        self.redis_server = LocalRedis(appendonly=appendonly, directory=str(self.directory / "redis"))
        self.sim = Simulator(api_key=self.api_key, latency=api_latency)
        self.receiver = Receiver(self.secret, latency=receiver_latency)
        self.processes: list[WorkerProcess] = []
        self._redis: redis.Redis | None = None
        self._started: list[Callable[[], None]] = []

    # lifecycle

    def start(self) -> Cluster:
        try:
            (self.directory / "redis").mkdir(exist_ok=True)
            self.redis_server.start()
            self._started.append(self.redis_server.stop)
            self.sim.start()
            self._started.append(self.sim.stop)
            self.receiver.start()
            self._started.append(self.receiver.stop)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        # Processes first: a worker left running would log connection errors forever.
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop(timeout=5)
        if self._redis is not None:
            self._redis.close()
        for stop in reversed(self._started):
            with contextlib.suppress(Exception):
                stop()
        self._started.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # settings

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    def env(self, **overrides: str | None) -> dict[str, str]:
        """The environment of a worker, beat or CLI of this cluster; an override of None removes it."""
        env = {k: v for k, v in os.environ.items() if k not in PROJECT_VARIABLES}
        env.update(
            {
                "REDIS_URL": self.redis_url,
                "CHECK365_BASE_URL": self.sim.url,
                "CHECK365_API_KEY": self.api_key,
                "WEBHOOK_SECRET": self.secret,
                **FAST_SETTINGS,
                # Unbuffered, so that a log line is in the file the moment it is written.
                "PYTHONUNBUFFERED": "1",
            }
        )
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def client_settings(self, **overrides: str | None) -> Settings:
        return make_settings(self.env(**overrides), process="cli")

    def callback_url(self, path: str) -> str:
        return self.receiver.url + path

    # processes

    def start_worker(
        self,
        name: str,
        concurrency: int | None = None,
        env_overrides: Mapping[str, str | None] | None = None,
        queue: str | None = None,
        *,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> WorkerProcess:
        """A ``celery -A worker worker`` consuming ``queue`` (default: CHECK365_QUEUE, else check365).

        The queue is also passed as CHECK365_QUEUE so that the worker's own follow-up
        messages (next polls, deliveries) stay on it. Without ``concurrency`` the pool
        is the app's own (its threads), as the production command starts it.
        """
        overrides = dict(env_overrides or {})
        queue = queue or overrides.get("CHECK365_QUEUE") or DEFAULT_QUEUE
        overrides["CHECK365_QUEUE"] = queue
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "worker",
            "-Q",
            queue,
            *(() if concurrency is None else ("--concurrency", str(concurrency))),
            "--hostname",
            f"{name}@%h",
            # Gossip and mingle cost seconds at start-up and nothing here needs them.
            "--without-gossip",
            "--without-mingle",
        ]
        process = WorkerProcess(name, args, self.env(**overrides), self.directory, WORKER_READY)
        self.processes.append(process)
        return process.wait_ready(timeout) if wait else process

    def start_beat(
        self,
        name: str = "beat",
        env_overrides: Mapping[str, str | None] | None = None,
        *,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> WorkerProcess:
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "beat",
            # A private schedule file: the default one lands in the working directory.
            "--schedule",
            str(self.directory / f"{name}-schedule"),
        ]
        process = WorkerProcess(name, args, self.env(**dict(env_overrides or {})), self.directory, BEAT_READY)
        self.processes.append(process)
        return process.wait_ready(timeout) if wait else process

    def cli(
        self, *args: str, env_overrides: Mapping[str, str | None] | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``check365-worker ARGS`` with this cluster's environment (the CLI needs no secrets)."""
        return subprocess.run(
            [*cli_command(), *args],
            env=self.env(**dict(env_overrides or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    # enqueueing

    def enqueue(
        self, job_id: str, callback_path: str, metadata: dict[str, Any] | None = None, **env_overrides: str | None
    ) -> str:
        """Enqueue a watch through the Python helper, as a producing service would; the task id."""
        return enqueue_watch(
            job_id, self.callback_url(callback_path), metadata, settings=self.client_settings(**env_overrides)
        )

    def send_raw(
        self,
        kwargs: Mapping[str, Any] | None = None,
        args: Sequence[Any] | None = None,
        *,
        task: str = WATCH_TASK,
        queue: str = DEFAULT_QUEUE,
        task_id: str | None = None,
        **options: Any,
    ) -> str:
        """Send a message by task name with a plain Celery app, as a foreign producer would.

        The same ``task_id`` twice is what the broker does when it delivers a message again.
        ``options`` are Celery's (``time_limit``, ``eta``, ``routing_key``...).
        """
        from celery import Celery

        app = Celery("foreign-producer", broker=self.redis_url, set_as_current=False)
        try:
            result = app.send_task(
                task,
                args=list(args) if args is not None else None,
                kwargs=dict(kwargs) if kwargs is not None else None,
                queue=queue,
                task_id=task_id,
                **options,
            )
            return str(result.id)
        finally:
            app.close()

    # state

    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url)
        return self._redis

    def watches(self) -> WatchStore:
        return WatchStore(self.redis(), state_ttl_s=3600)

    def watch_state(self, job_id: str) -> list[Watch]:
        """Every watch of ``job_id``, oldest first."""
        return self.watches().for_job(job_id)

    def outbox(self) -> Outbox:
        return Outbox(self.redis(), state_ttl_s=3600)

    def error_records(self, job_id_prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
        """(process name, record) for every error-level log record, of jobs starting with a prefix.

        Failures the system handles (a failed attempt, a transient error) are warnings;
        an error-level record means a step crashed, which a flow test should not let pass.
        The exceptions are ``OPERATOR_ALERTS``: errors on purpose, asking an operator to
        fix the deployment.
        """
        found = []
        for process in self.processes:
            for record in process.log_records():
                job = str(record.get("job_id", ""))
                if (
                    record.get("level") in ("error", "critical")
                    and record.get("event") not in OPERATOR_ALERTS
                    and job.startswith(job_id_prefix)
                    and (job or not job_id_prefix)
                ):
                    found.append((process.name, record))
        return found

    def queue_length(self, queue: str = DEFAULT_QUEUE) -> int:
        """Messages waiting in ``queue``: kombu's Redis transport keeps a queue as a list of its name."""
        return int(self.redis().llen(queue))

    def unacked_count(self) -> int:
        """Messages reserved by workers (countdowns held in memory, running tasks), all queues together."""
        return int(self.redis().hlen(KOMBU_UNACKED))

    def drop_broker_messages(self, queue: str = DEFAULT_QUEUE) -> int:
        """Delete every message of ``queue`` (and of its deliveries' queue) and every reserved message.

        What a lost message looks like. Only safe while no worker runs: a running worker
        still holds its reserved messages in memory. Returns how many messages were deleted.
        """
        client = self.redis()
        with client.pipeline() as pipe:
            pipe.llen(queue)
            pipe.llen(delivery_queue(queue))
            pipe.hlen(KOMBU_UNACKED)
            pipe.delete(queue, delivery_queue(queue), KOMBU_UNACKED, KOMBU_UNACKED_INDEX, KOMBU_UNACKED_MUTEX)
            waiting, deliveries, reserved, _ = pipe.execute()
        return int(waiting) + int(deliveries) + int(reserved)

    def active_watch_count(self) -> int:
        """Watches not finished yet, in the whole system (every active watch is in the due set)."""
        return self.watches().items.count_active()

    def pending_event_count(self) -> int:
        """Events neither delivered nor dead-lettered yet."""
        return self.outbox().items.count_active()


# --------------------------------------------------------------------------- waiting and reading webhooks


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """The first truthy value of ``predicate()``; TimeoutError naming ``what`` if none comes in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def quiet_period(seconds: float) -> None:
    """Give a system that should stay silent the time to misbehave before asserting that it did not.

    A negative assertion ("no second webhook") needs some wait; callers pick a period
    longer than any retry delay and sweep interval of the settings under test.
    """
    time.sleep(seconds)


def webhook_ids(received: Sequence[Any]) -> list[str]:
    """The distinct webhook-id values of ``received``, in order of first arrival."""
    seen: dict[str, None] = {}
    for item in received:
        seen.setdefault(item.headers.get("webhook-id", ""), None)
    return list(seen)
