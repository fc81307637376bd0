"""check365_client, as a producer service uses it: a real Redis, a real worker, real webhooks.

The service tree test is the packaging promise: a service laid out like
cookiecutter-django (its own ``config/settings/`` package) with its own ``worker.py``
and its own ``REDIS_URL`` and ``LOG_LEVEL`` imports the client, enqueues, and reads the
watch's state, while the worker pool processes the watch.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis

from check365_client import (
    DEFAULT_QUEUE,
    WATCH_TASK,
    BrokerUnavailable,
    Check365Client,
    InvalidWatchRequest,
    get_watch,
)
from check365_client.names import job_index_key, watch_key
from tests.support.cluster import Cluster, wait_until, webhook_ids
from worker.local.redisserver import free_port

pytestmark = pytest.mark.integration

TIMEOUT = 25.0

SERVICE_ENQUEUE = """
import json, sys

import config.settings  # the service's own settings package
import worker  # the service's own worker module

from check365_client import enqueue_watch

broker_url, job_id, callback_url = sys.argv[1:4]
task_id = enqueue_watch(
    job_id, callback_url, {"service": config.settings.SERVICE_NAME},
    broker_url=broker_url, allow_http=True, allow_private_networks=True,
)
print(json.dumps({
    "task_id": task_id,
    "service_worker": worker.__file__,
    "service_config": config.settings.__file__,
    "ours": sorted(m for m in sys.modules if m.startswith(("worker.", "config.")) and m != "config.settings"),
}))
"""

SERVICE_READ = """
import json, sys

import config.settings
import worker

from check365_client import get_watch

watch = get_watch(sys.argv[2], broker_url=sys.argv[1])
print(json.dumps(None if watch is None else {"state": watch.state, "outcome": watch.outcome,
                                              "polls": watch.polls, "metadata": watch.metadata}))
"""


def service_tree(root: Path) -> Path:
    """A producer's project: cookiecutter-django's ``config/settings/`` and a ``worker.py`` of its own."""
    (root / "config" / "settings").mkdir(parents=True)
    (root / "config" / "__init__.py").write_text("")
    # No ``Settings`` here: code of ours that imported ``config.settings`` would fail.
    (root / "config" / "settings" / "__init__.py").write_text('SERVICE_NAME = "orders"\n')
    (root / "worker.py").write_text('"""The service\'s own background worker."""\nSERVICE_WORKER = True\n')
    (root / "enqueue.py").write_text(textwrap.dedent(SERVICE_ENQUEUE))
    (root / "read.py").write_text(textwrap.dedent(SERVICE_READ))
    return root


def run_service(cluster: Cluster, root: Path, script: str, *args: str) -> Any:
    env = cluster.env()
    # The service's own environment: none of it may reach the client.
    env.update(
        REDIS_URL="redis://127.0.0.1:1/9",  # the service's cache, not the broker
        LOG_LEVEL="trace",
        METRICS_PORT="none",
        CHECK365_QUEUE="not a queue!",
        WEBHOOK_ALLOW_HTTP="maybe",
        DJANGO_SETTINGS_MODULE="config.settings",
    )
    for name in ("CHECK365_API_KEY", "WEBHOOK_SECRET"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, script, *args], cwd=root, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_service_with_its_own_config_and_worker_enqueues_and_the_pool_delivers(
    cluster: Cluster, job_id: str, hook_path: str, tmp_path: Path
) -> None:
    root = service_tree(tmp_path / "service")
    cluster.sim.add_job(job_id, size=3, duration_s=0.5)

    sent = run_service(cluster, root, "enqueue.py", cluster.redis_url, job_id, cluster.callback_url(hook_path))

    # The service's own modules won, and nothing of ours was imported under their names.
    assert sent["service_worker"] == str(root / "worker.py")
    assert sent["service_config"] == str(root / "config" / "settings" / "__init__.py")
    assert sent["ours"] == []
    cluster.receiver.wait_for(lambda rx: len(webhook_ids([r for r in rx if r.path == hook_path])) >= 1, TIMEOUT)
    (request,) = cluster.receiver.received(hook_path)
    assert request.verified, request.error
    body = request.json()
    assert body["type"] == "bulk_validation.completed"
    assert body["data"]["metadata"] == {"service": "orders"}

    def finished() -> Any:
        state = run_service(cluster, root, "read.py", cluster.redis_url, job_id)
        return state if state and state["state"] == "finished" else None

    state = wait_until(finished, TIMEOUT, "the service to read its finished watch")
    assert state["outcome"] == "completed"
    assert state["polls"] >= 1
    assert state["metadata"] == {"service": "orders"}


def test_the_message_is_the_contracts_task_on_the_check365_queue(cluster: Cluster) -> None:
    # A queue no worker consumes, so that the message stays to be read.
    client = Check365Client(cluster.redis_url, queue="it-client-wire")
    task_id = client.enqueue_watch("J-wire", "https://hooks.example.com/check365", {"order": 17})

    raw = redis.Redis.from_url(cluster.redis_url).lpop("it-client-wire")
    assert raw is not None
    envelope = json.loads(raw)
    assert envelope["headers"]["task"] == WATCH_TASK == "check365.watch_bulk_job"
    assert envelope["headers"]["id"] == task_id
    args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    assert args == []
    assert kwargs == {
        "job_id": "J-wire",
        "callback_url": "https://hooks.example.com/check365",
        "metadata": {"order": 17},
    }
    assert envelope["properties"]["delivery_info"]["routing_key"] == "it-client-wire"
    assert DEFAULT_QUEUE == Check365Client(cluster.redis_url).queue == "check365"
    client.close()


def test_bad_input_is_refused_before_anything_is_sent(cluster: Cluster) -> None:
    client = Check365Client(cluster.redis_url, queue="it-client-refused")
    for job_id, url, metadata in [
        ("bad id", "https://hooks.example.com/x", None),
        ("J", "http://hooks.example.com/x", None),  # plain http unless allowed
        ("J", "https://127.0.0.1/x", None),  # a private address unless allowed
        ("J", "https://hooks.example.com/x", {"a": "x" * 5000}),
    ]:
        with pytest.raises(InvalidWatchRequest):
            client.enqueue_watch(job_id, url, metadata)
    assert redis.Redis.from_url(cluster.redis_url).llen("it-client-refused") == 0
    client.close()


def test_get_watch_follows_a_watch_and_knows_none_for_an_unknown_job(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    cluster.sim.add_job(job_id, size=2, duration_s=0.3)
    client = Check365Client(cluster.redis_url, allow_http=True, allow_private_networks=True)
    assert client.get_watch(job_id) is None

    client.enqueue_watch(job_id, cluster.callback_url(hook_path), {"k": 1})
    watch = wait_until(lambda: client.get_watch(job_id), TIMEOUT, "the watch to exist")
    assert watch.job_id == job_id
    assert watch.callback_url == cluster.callback_url(hook_path)
    assert watch.metadata == {"k": 1}

    done = wait_until(lambda: (w := client.get_watch(job_id)) and not w.active and w, TIMEOUT, "the watch to end")
    assert (done.state, done.outcome) == ("finished", "completed")
    assert len(done.events) == 1
    assert get_watch(job_id, cluster.callback_url(hook_path), broker_url=cluster.redis_url) == done
    assert client.get_watch(job_id, "https://elsewhere.example.com/") is None
    client.close()


def test_a_broker_that_is_down_is_a_client_error_not_kombus() -> None:
    client = Check365Client(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(BrokerUnavailable):
        client.enqueue_watch("J-down", "https://hooks.example.com/x")
    with pytest.raises(BrokerUnavailable):
        client.get_watch("J-down")
    # Validation still comes first: bad input is named even with the broker down.
    with pytest.raises(InvalidWatchRequest):
        client.enqueue_watch("bad id", "https://hooks.example.com/x")
    assert "127.0.0.1" not in repr(client)


def test_a_watch_hash_with_odd_values_is_read_without_crashing(cluster: Cluster) -> None:
    # State written by another version, or by hand: the reader keeps what it can and drops the rest.
    client = Check365Client(cluster.redis_url)
    store = redis.Redis.from_url(cluster.redis_url)
    job = "J-odd-state"
    store.sadd(job_index_key(job), "w_odd", "w_gone")
    store.hset(
        watch_key("w_odd"),
        mapping={
            "watch_id": "w_odd",
            "job_id": job,
            "state": "active",
            "metadata": "{not json",
            "polls": "many",
            "last_progress": "nan",
            "started_at": "1e400",
            "due": "17",
            "events": "[1, 2",
        },
    )
    try:
        (watch,) = client.get_watches(job)
        assert (watch.watch_id, watch.state, watch.polls) == ("w_odd", "active", 0)
        assert watch.metadata is None and watch.events == () and watch.last_progress is None
        assert watch.next_poll_at == 17.0
    finally:
        store.delete(job_index_key(job), watch_key("w_odd"))
        client.close()
