"""A rolling upgrade: Redis state and broker messages written by an older version, consumed by this one.

    git worktree add --detach /tmp/check365-old <commit>
    python -m benchmarks.upgrade /tmp/check365-old

Everything real and on this machine: a Redis server, the Check365 simulator and a
verifying receiver (``tests.support.cluster``). The older checkout's own code (put
first on ``PYTHONPATH``) runs a worker and a producer; this checkout's worker, beat
and console script then take over:

1. the old producer enqueues, and the old worker works on,
   - ``running``: 4 jobs of 30 results lasting 8 s (watches mid-poll at the switch),
   - ``retrying``: 2 jobs of 2,500 results (3 parts each), whose receiver answers 503
     to the first 2 tries of each part: parts waiting for a countdown retry or, after
     the second failure, for the sweep (a delay too long for a countdown),
   - ``dead``: 1 job whose receiver answers 410: a dead letter;
2. the old worker stops with SIGTERM (warm shutdown: its countdown messages go back
   to the queue as it wrote them); the old producer then enqueues
   - ``queued``: 3 jobs, start messages waiting in the queue with no worker running;
3. this version's worker and beat start, and its console script replays the old dead
   letter.

It passes when every job's webhooks arrive, verified, with every part of every job
and each webhook-id counted; when the replayed dead letter keeps its webhook-id; and
when the new worker logs no rejected message and no error. Exit status 0 or 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.cluster import Cluster, quiet_period, wait_until, webhook_ids

GROUPS = {"running": (4, 30, 8.0), "retrying": (2, 2500, 0.5), "dead": (1, 3, 0.3), "queued": (3, 5, 1.0)}
PARTS = {"running": 1, "retrying": 3, "dead": 1, "queued": 1}
OLD_ENV = {"WEBHOOK_RETRY_DELAYS_S": "0.3,6,6"}

# The older version's own helper, with its own settings (read from the environment).
_PRODUCER = """
import json, sys
from worker.enqueue import enqueue_watch
for job_id, url in json.loads(sys.argv[1]):
    enqueue_watch(job_id, url, {"upgrade": True})
"""


def _old_enqueue(cluster: Cluster, old_tree: Path, jobs: list[tuple[str, str]]) -> None:
    env = cluster.env(**OLD_ENV, PYTHONPATH=str(old_tree))
    subprocess.run([sys.executable, "-c", _PRODUCER, json.dumps(jobs)], env=env, cwd=str(cluster.directory), check=True)


def run(old_tree: Path) -> list[str]:
    problems: list[str] = []
    with Cluster() as cluster:
        jobs: dict[str, list[tuple[str, str]]] = {}
        for group, (count, size, duration) in GROUPS.items():
            jobs[group] = []
            for i in range(count):
                job_id = f"upgrade-{group}-{i}"
                cluster.sim.add_job(job_id, size=size, duration_s=duration)
                jobs[group].append((job_id, cluster.callback_url(f"/{job_id}")))
        for job_id, _ in jobs["retrying"]:
            cluster.receiver.script(f"/{job_id}", [503] * 6)
        for job_id, _ in jobs["dead"]:
            cluster.receiver.default(f"/{job_id}", 410)

        old = cluster.start_worker("old", env_overrides={**OLD_ENV, "PYTHONPATH": str(old_tree)})
        _old_enqueue(cluster, old_tree, jobs["running"] + jobs["retrying"] + jobs["dead"])
        outbox = cluster.outbox()
        wait_until(lambda: len(outbox.dead_letters()) == 1, 60, "the old worker's dead letter")
        wait_until(
            lambda: all(len(cluster.receiver.received(f"/{j}")) >= 3 for j, _ in jobs["retrying"]),
            60,
            "the old worker's first failed attempts",
        )
        running = [w for j, _ in jobs["running"] for w in cluster.watch_state(j)]
        if not running or any(w.state != "active" or w.polls < 1 for w in running):
            problems.append(
                f"the running jobs were not mid-poll at the switch: {[(w.state, w.polls) for w in running]}"
            )
        old.stop(signal.SIGTERM)
        dead = outbox.dead_letters()
        _old_enqueue(cluster, old_tree, jobs["queued"])
        at_switch = {
            "watches active": cluster.active_watch_count(),
            "events pending": cluster.pending_event_count(),
            "dead letters": len(dead),
            "messages queued": cluster.queue_length(),
        }
        print("written by the old version:", at_switch)

        new = cluster.start_worker("new")
        cluster.start_beat("new-beat")
        cluster.receiver.default(f"/{jobs['dead'][0][0]}", 200)
        replay = cluster.cli("dead-letters", "replay", dead[0])
        if replay.returncode != 0:
            problems.append(f"replay failed: {replay.stderr.strip()[:300]}")

        def delivered(group: str) -> bool:
            return all(
                len({*webhook_ids([r for r in cluster.receiver.received(f"/{j}") if r.status_sent == 200])})
                == PARTS[group]
                for j, _ in jobs[group]
            )

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(delivered(g) for g in GROUPS):
            time.sleep(0.2)
        quiet_period(2)
        for group in GROUPS:
            for job_id, _ in jobs[group]:
                received = cluster.receiver.received(f"/{job_id}")
                ok = {*webhook_ids([r for r in received if r.status_sent == 200])}
                if len(ok) != PARTS[group] or not all(r.verified for r in received):
                    problems.append(f"{job_id}: {len(ok)} of {PARTS[group]} parts delivered")
        dead_job = jobs["dead"][0][0]
        dead_ids = {*webhook_ids(cluster.receiver.received(f"/{dead_job}"))}
        if dead_ids != {dead[0]}:
            problems.append(f"the replayed dead letter changed its webhook-id: {dead_ids} vs {dead[0]}")
        for record in new.log_records():
            if record.get("event") in ("watch_rejected", "delivery_rejected") or record.get("level") == "error":
                problems.append(f"the new worker logged {record.get('event')}: {str(record)[:300]}")
        print("after the new version ran:", {
            "watches active": cluster.active_watch_count(),
            "events pending": cluster.pending_event_count(),
            "dead letters": len(outbox.dead_letters()),
            "webhooks received": len(cluster.receiver.received()),
        })  # fmt: skip
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_tree", type=Path, help="a checkout of the older version")
    args = parser.parse_args(argv)
    if not (args.old_tree / "worker").is_dir():
        parser.error(f"{args.old_tree} is not a checkout of check365-worker")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    problems = run(args.old_tree.resolve())
    for problem in problems:
        print("FAIL:", problem)
    print("PASS" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
