"""The Celery internals the message boundary (``worker.intake.boundary``) relies on.

Checked against celery 5.7.0 and kombu 5.7.0; pyproject pins ``celery[redis]>=5.7,<5.8``
(celery 5.7 requires kombu 5.7). ``OVERRIDDEN`` records a digest of the source of every
Celery or kombu function the boundary subclasses, wraps, copies or reads the private
state of; tests/unit/test_celery_internals.py fails when an installed release changes
one of them, and tests/reliability/test_hostile_messages.py and test_redis_restart.py
exercise the behaviour with real workers. Moving the pin means reading each function
below against the new release, adjusting this module, and recording the new digests.
"""

from __future__ import annotations

from typing import Any

from celery.worker.state import active_requests

from worker.runtime import logs

log = logs.get_logger("check365.boundary")

CHECKED_WITH = {"celery": "5.7.0", "kombu": "5.7.0"}

# "module:qualified.name" -> sha256 of its source (``inspect.getsource``), and why we care.
OVERRIDDEN: dict[str, tuple[str, str]] = {
    "celery.worker.request:Request.__init__": (
        "efdf47149cde3635e72da17b40955717021738260a959b3cfddb4e7461b0a323",
        "CheckedRequest wraps it: what it raises on a malformed message, and that it decodes the body",
    ),
    "celery.worker.request:Request._payload": (
        "c386dd3e82a1b91bc9048acd59087bdbe513b5fcb9fdafd52d035cc697e98d58",
        "read by payload(): the decoded (args, kwargs, embed) triple, private",
    ),
    "celery.worker.consumer.consumer:Consumer.create_task_handler": (
        "292c5a681f10ade7181d68b4fc129daa67ca551461a246300d60f9a7ec2310de",
        "CheckedConsumer wraps the handler it returns; its strategy lookup is what _routing_problem pre-checks",
    ),
    "celery.worker.consumer.consumer:Consumer.on_connection_error_after_connected": (
        "4f84dbfff329d28f48fb7dffad999b194b4b12bc1e3b444161ec106efce91f64",
        "CheckedConsumer overrides it; after_failed_connection_cleanup copies its end",
    ),
    "celery.worker.consumer.consumer:Consumer.on_decode_error": (
        "e3538c586a7ffa758a9bcc654564aa5b1a22fe53ce571f785ba2f3742f53a612",
        "CheckedConsumer overrides it to log the rejection, then calls it",
    ),
    "celery.worker.request:Request.acknowledge": (
        "60dad9ce9c39f54ca7c456f700fe5cb037172f4eaad92e5f77232479868c5d2e",
        "forget_uncancelled_acks sets ``acknowledged`` so that it sends no ack",
    ),
    "kombu.message:Message.ack_log_error": (
        "92c852ddae294815cdb48629be6cd23da4f1cdcc05b0e46a7e8705f52a326b54",
        "tolerate_torn_down_channel relies on it logging, not raising, the errors it is given",
    ),
    "celery.worker.consumer.consumer:Consumer.call_soon_ack": (
        "39f8579d076243fcb4180e7e3e90285fddc12b71695fa1d00e48ecd3b3c0e8e0",
        "with a hub it runs the ack later, on the consumer's loop: why tolerate_torn_down_channel exists",
    ),
    "kombu.message:Message.reject_log_error": (
        "894bb41e9964619b8446dc8ba321d373b15b669a463695eacc69f780b83cb9fb",
        "how CheckedConsumer drops a message it refuses",
    ),
}


def payload(request: Any) -> tuple[Any, Any, Any]:
    """The request's decoded body, as Celery hands it to the pool: (args, kwargs, embed).

    Celery keeps it in a name-mangled attribute behind the private ``_payload``.
    """
    args, kwargs, embed = request._payload
    return args, kwargs, embed


def tolerate_torn_down_channel(request: Any) -> None:
    """Let the request's ack (or reject) meet a torn-down channel without stopping the worker.

    A step's thread does not send its ack: ``Request.acknowledge`` hands ``Message.ack_log_error``
    to ``Consumer.call_soon_ack``, which runs it later on the consumer's loop, with the
    request's ``_connection_errors`` as the errors to log rather than raise. An ack queued just
    before the broker connection was lost runs after kombu tore the channel down: AttributeError
    ('NoneType' object has no attribute 'hostname') in the consumer's loop, and Celery stops the
    worker as "Unrecoverable" (seen in test_redis_restart). Counted among those errors, it is
    logged ("Couldn't ack") and the message, never acked, comes back after the visibility
    timeout, where the step's token makes it a no-op.
    """
    request._connection_errors = (*request._connection_errors, AttributeError)


def after_failed_connection_cleanup(consumer: Any) -> None:
    """What ``Consumer.on_connection_error_after_connected`` does after closing the lost
    connection, for when that close raised: forget the connection, and cancel the
    late-acknowledged requests still running when the configuration says so (Celery's
    default). Celery's temporary reduction of the prefetch count after a reconnect is
    left out: the worker reconnects with its usual prefetch (one per process).
    """
    consumer.connection = None
    if consumer.app.conf.worker_cancel_long_running_tasks_on_connection_loss:
        for request in tuple(active_requests):
            if request.task.acks_late and not request.acknowledged:
                try:
                    request.cancel(consumer.pool)
                except Exception:  # the same leniency as Celery's own loop
                    log.warning("request_cancel_failed", task_id=request.id, exc_info=True)


def forget_uncancelled_acks(consumer: Any) -> None:
    """After a lost broker connection, the late acks of the requests still running are not sent.

    The prefork pool's requests were cancelled (their processes killed); a threads pool
    cannot cancel (``terminate_job`` raises NotImplementedError), so its steps run on and
    would ack their message on the channel of the lost connection, which kombu has
    already torn down: AttributeError ('NoneType' object has no attribute 'hostname')
    in the consumer, and Celery stops the worker as "Unrecoverable". Unacked, the message
    stays reserved in Redis and comes back after the visibility timeout, where the step's
    token makes it a no-op, as for any redelivered message.
    """
    for request in tuple(active_requests):
        if request.task.acks_late and not request.acknowledged:
            request.acknowledged = True
            log.warning("ack_dropped_after_connection_loss", task_id=request.id)
