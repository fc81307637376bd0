"""A step that finishes after the broker connection was replaced must not stop the worker.

Its ack goes to a channel kombu has torn down, which raises AttributeError from inside
kombu; the ack is logged as failed instead (the message comes back after the visibility
timeout, where the step's token makes it a no-op), whether it is sent at once or, as the
consumer's loop does, queued by the step and run later.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu.message import Message

from check365_client.names import WATCH_TASK
from worker.intake.boundary import CheckedRequest, CheckedTask


class TornDownChannel:
    no_ack_consumers = None

    def basic_ack(self, *args: Any, **kwargs: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'hostname'")


def request_on(channel: object, on_ack: Callable[[Message], Any] | None = None) -> CheckedRequest:
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
    ack = message.ack_log_error if on_ack is None else on_ack(message)
    return CheckedRequest(message, on_ack=ack, app=app, task=watch, connection_errors=(ConnectionError,))


def test_an_ack_on_a_torn_down_channel_is_dropped_not_raised() -> None:
    request = request_on(TornDownChannel())
    request.acknowledge()
    assert request.acknowledged


def test_an_ack_queued_before_the_loss_and_run_after_it_is_logged_not_raised() -> None:
    # As Consumer.call_soon_ack does with a hub: the step's thread queues the ack, the
    # consumer's loop runs it later, by when the channel may have been torn down.
    queued: list[Callable[[], None]] = []

    def on_ack(message: Message) -> Callable[..., None]:
        return lambda logger, errors: queued.append(lambda: message.ack_log_error(logger, errors))

    request = request_on(TornDownChannel(), on_ack)
    request.acknowledge()
    assert request.acknowledged and len(queued) == 1
    queued[0]()  # the consumer's loop: raising here would stop the worker
