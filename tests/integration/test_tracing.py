"""OpenTelemetry (the optional extra ``otel``): one trace from the producer's enqueue_watch
through every poll to every delivery attempt, and the W3C traceparent each webhook carries.

The worker runs in a child process with the SDK's in-memory exporter as its tracer
provider: Celery's ``start_worker`` (a real consumer on the real Redis broker, solo
pool) serves the tasks, and the same process plays the producer. The child prints
the finished spans as JSON lines; the receiver, the simulator and Redis are this
test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster

pytest.importorskip("opentelemetry.sdk")

pytestmark = pytest.mark.integration

JOB = "sim-5-1.5s"  # 5 results over 1.5 s: several polls; 2 per part: 3 parts

CHILD = r"""
import json, sys, time
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

from celery.contrib.testing.worker import start_worker
from worker.app import app, settings
from check365_client import enqueue_watch

job, callback, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
with start_worker(app, pool="solo", concurrency=1, perform_ping_check=False, shutdown_timeout=10):
    enqueue_watch(job, callback, {"traced": True}, broker_url=settings.redis_url, queue=settings.queue,
                  allow_http=True, allow_private_networks=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = [s for s in exporter.get_finished_spans()
                if s.name == "check365.deliver" and s.attributes.get("check365.delivered")]
        if len(done) >= expected:
            break
        time.sleep(0.1)
for s in exporter.get_finished_spans():
    print(json.dumps({
        "name": s.name,
        "kind": s.kind.name,
        "trace_id": format(s.context.trace_id, "032x"),
        "span_id": format(s.context.span_id, "016x"),
        "parent_id": format(s.parent.span_id, "016x") if s.parent else None,
        "attributes": dict(s.attributes),
    }))
"""


def test_one_trace_from_enqueue_through_every_poll_to_every_delivery_attempt(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        path = "/hooks/traced"
        # The first attempt at one part fails: its retry is another span of the same trace.
        cluster.receiver.script(path, [500])
        env = cluster.env(WEBHOOK_MAX_RESULTS_PER_PART="2", POLL_INITIAL_DELAY_S="0.3", POLL_MAX_DELAY_S="0.5")
        child = subprocess.run(
            [sys.executable, "-c", CHILD, JOB, cluster.callback_url(path), "3"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert child.returncode == 0, child.stderr[-3000:]
        spans = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
        received = cluster.receiver.received(path)

    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    (enqueue,) = by_name["check365.enqueue_watch"]
    (watch,) = by_name["check365.watch"]
    polls = by_name["check365.poll"]
    deliveries = by_name["check365.deliver"]

    # One trace: the producer's span is its root.
    assert {s["trace_id"] for s in spans} == {enqueue["trace_id"]}
    assert enqueue["parent_id"] is None
    assert enqueue["kind"] == "PRODUCER"
    assert enqueue["attributes"]["check365.job_id"] == JOB
    assert watch["parent_id"] == enqueue["span_id"]
    # Every poll, the first and the one that saw the job completed, hangs off the watch.
    assert len(polls) >= 2
    assert {p["parent_id"] for p in polls} == {watch["span_id"]}
    assert sorted(p["attributes"]["check365.poll"] for p in polls) == list(range(1, len(polls) + 1))
    assert polls[-1]["attributes"]["check365.step"] == "completed"
    # Every delivery attempt (3 parts, one of them twice) is a span of the same trace.
    assert len(deliveries) == 4
    assert {d["parent_id"] for d in deliveries} == {watch["span_id"]}
    assert sorted(d["attributes"]["http.response.status_code"] for d in deliveries) == [200, 200, 200, 500]

    # Each webhook carried the context of the very attempt that sent it.
    assert len(received) == 4
    sent = {d["span_id"] for d in deliveries}
    seen = set()
    for request in received:
        version, trace_id, span_id, flags = request.headers["traceparent"].split("-")
        assert (version, trace_id) == ("00", enqueue["trace_id"])
        assert int(flags, 16) & 1, "sampled"
        assert span_id in sent
        seen.add(span_id)
    assert seen == sent
    assert all(r.verified for r in received)
