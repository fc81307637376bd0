"""Celery signal receivers: the deliveries' queue, one logging pipeline, and job_id/task_id bound per task."""

from __future__ import annotations

from typing import Any

import structlog
from celery import signals

from worker.app import settings
from worker.ops import metrics
from worker.runtime.celeryconfig import delivery_queue
from worker.runtime.logs import configure_logging

metrics.connect_worker_signals(settings)


@signals.worker_init.connect
def _consume_deliveries(sender: Any = None, **_: Any) -> None:
    # ``-Q check365`` selects the polls' queue; the deliveries' queue is part of the same
    # worker by configuration, so that the production command stays one queue long. Sent
    # once the queues are selected, before consuming, by `celery worker` and start_worker alike.
    app = getattr(sender, "app", None)
    if app is not None:
        app.amqp.queues.select_add(delivery_queue(settings.queue))


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # Connecting this receiver stops Celery from configuring logging itself.
    configure_logging(settings)


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, kwargs: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    job_id = kwargs.get("job_id") if isinstance(kwargs, dict) else None
    bound: dict[str, Any] = {"task_id": task_id, "task": getattr(task, "name", None)}
    if isinstance(job_id, str):
        bound["job_id"] = job_id[:128]
    request = getattr(task, "request", None)
    delivery = getattr(request, "delivery_info", None) or {}
    bound["redelivered"] = bool(delivery.get("redelivered"))
    structlog.contextvars.bind_contextvars(**bound)


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()
