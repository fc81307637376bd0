"""Celery settings derived from ``Settings``.

Each choice here answers a Redis-broker pitfall; see docs/design.md.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from check365_client.names import WATCH_TASK
from worker.delivery.policy import longest_timeout_s
from worker.settings import Settings

__all__ = ["DELIVER_TASK", "SWEEP_TASK", "WATCH_TASK", "celery_config", "deliver_kwargs"]

DELIVER_TASK = "check365.deliver_webhook"
SWEEP_TASK = "check365.sweep"


def deliver_kwargs(webhook_id: str, token: str) -> dict[str, str]:
    """The kwargs of a ``DELIVER_TASK`` message: the event, and the token that wakes its step."""
    return {"webhook_id": webhook_id, "token": token}


# The pool: threads, from this configuration, so that ``celery -A worker worker`` needs no
# flag. A step spends nearly all its time waiting on Check365, a receiver or Redis, and a
# waiting thread holds no CPU; 192 keep one core busy with Check365 and the receivers
# answering in 250 ms (docs/design.md, "Execution model"). Steps bound themselves:
# worker/runtime/deadlines.py.
WORKER_POOL = "threads"
WORKER_THREADS = 192
# Where the boundary finds the longest delay this worker ever asks of the broker: a poll's
# countdown (at most POLL_MAX_DELAY_S; longer webhook retries wait in Redis, not the broker),
# plus the clock difference allowed between the host that sent a message and this one.
MAX_ETA_KEY = "check365_max_eta_s"
ETA_CLOCK_SKEW_S = 60.0


def delivery_queue(poll_queue: str) -> str:
    """The queue of the deliveries of watches polled on ``poll_queue``.

    Polls and deliveries have queues of their own, both consumed by every worker (the
    second is added at start-up: worker/runtime/signals.py), so that a backlog of
    deliveries never stands in the way of a due poll (docs/design.md, "Execution model").
    """
    return f"{poll_queue}.deliveries"


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility = settings.broker_visibility_timeout_s
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        # Every process sharing the broker must use the same value: kombu restores
        # any message unacked for longer, and the shortest setting wins.
        "broker_transport_options": {
            "visibility_timeout": visibility,
            "polling_interval": 0.1,
            # kombu's Redis connections, shared by the threads that acknowledge and publish.
            "max_connections": WORKER_THREADS + 16,
        },
        # Producers for the follow-up messages the threads publish at once.
        "broker_pool_limit": WORKER_THREADS,
        "worker_pool": WORKER_POOL,
        MAX_ETA_KEY: settings.poll_max_delay_s + ETA_CLOCK_SKEW_S,
        "worker_concurrency": WORKER_THREADS,
        # No result backend: outcomes live in the watch state, not in task results.
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        # A poll is read-only and a delivery is idempotent per webhook-id, so a task
        # interrupted by a crash may safely run again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        "task_routes": {
            DELIVER_TASK: {"queue": delivery_queue(settings.queue)},
            "check365.*": {"queue": settings.queue},
        },
        "task_create_missing_queues": True,
        # Hung connections must not pin a slot forever; the HTTP timeouts are far shorter.
        "task_time_limit": max(settings.check365_timeout_s, longest_timeout_s(settings)) * 4 + 60,
        # A message Celery cannot take apart is rejected and logged instead of stopping the
        # worker (and, put back on the queue, every worker after it): see worker/runtime/tasks.py.
        "worker_consumer": "worker.intake.boundary:CheckedConsumer",
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Warm shutdown hands reserved messages back at once; the soft timeout lets a
        # running poll or delivery finish first.
        "worker_soft_shutdown_timeout": 10.0,
        "worker_enable_soft_shutdown_on_idle": True,
        "beat_schedule": {
            "check365-sweep": {
                "task": SWEEP_TASK,
                "schedule": timedelta(seconds=settings.sweep_interval_s),
                "options": {"queue": settings.queue, "expires": settings.sweep_interval_s * 2},
            }
        },
    }
