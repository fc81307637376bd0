"""A step that finishes after the broker connection was replaced must not stop the worker.

Its ack goes to a channel kombu has torn down, which raises AttributeError from inside
kombu; the request drops the ack instead (the message comes back after the visibility
timeout, where the step's token makes it a no-op).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from celery import Celery
from kombu.message import Message

from check365_client.names import WATCH_TASK
from worker.intake.boundary import CheckedRequest, CheckedTask


class TornDownChannel:
    no_ack_consumers = None

    def basic_ack(self, *args: Any, **kwargs: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'hostname'")


def request_on(channel: object) -> CheckedRequest:
    app = Celery("late-ack", set_as_current=False)

    @app.task(name=WATCH_TASK, base=CheckedTask, acks_late=True, shared=False)
    def watch(**kwargs: Any) -> None:
        return None

    kwargs = {"job_id": "J-1", "callback_url": "https://hooks.example.com/x"}
    headers, properties, body, _ = app.amqp.as_task_v2(str(uuid.uuid4()), WATCH_TASK, args=(), kwargs=kwargs)
    message = Message(
        body=json.dumps(body).encode(),
        channel=channel,
        delivery_tag=1,
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        properties=properties,
        delivery_info={"exchange": "", "routing_key": "check365"},
    )
    return CheckedRequest(message, on_ack=message.ack_log_error, app=app, task=watch, connection_errors=())


def test_an_ack_on_a_torn_down_channel_is_dropped_not_raised() -> None:
    request = request_on(TornDownChannel())
    request.acknowledge()
    assert request.acknowledged
