"""Enqueueing from the worker's own tools (the CLI, the demo), with the worker's settings.

Producers use ``check365_client`` directly; this module only builds that client from
``Settings`` (broker, queue, and the callback URL rules this deployment applies), and a
send-only Celery app for the worker's other tasks (replaying a dead letter).
"""

from __future__ import annotations

from typing import Any

from check365_client import Check365Client
from worker.settings import Settings, load_settings

_clients: dict[tuple[Settings, str | None], Check365Client] = {}
_apps: dict[str, Any] = {}


def client_for(settings: Settings, endpoints_file: str | None = None) -> Check365Client:
    """The producers' client, configured as this deployment's workers are.

    ``endpoints_file`` (default: ``WEBHOOK_ENDPOINTS_FILE``) refuses callback URLs of no
    endpoint, as the workers do with ``WEBHOOK_ENDPOINTS_ONLY``; given explicitly, always.
    """
    client = _clients.get((settings, endpoints_file))
    if client is None:
        path = endpoints_file or settings.webhook_endpoints_file or None
        client = _clients[(settings, endpoints_file)] = Check365Client(
            settings.redis_url,
            queue=settings.queue,
            allow_http=settings.webhook_allow_http,
            allow_private_networks=settings.webhook_allow_private_networks,
            endpoints_file=path,
            endpoints_only=bool(endpoints_file) or settings.webhook_endpoints_only,
        )
    return client


def enqueue_watch(
    job_id: str,
    callback_url: str,
    metadata: dict[str, Any] | None = None,
    *,
    settings: Settings | None = None,
    endpoints_file: str | None = None,
) -> str:
    """``check365_client.enqueue_watch`` with this deployment's settings; returns the message's id."""
    client = client_for(settings or load_settings(process="cli"), endpoints_file)
    return client.enqueue_watch(job_id, callback_url, metadata)


def client_app(settings: Settings) -> Any:
    """A minimal Celery app that can only send: no tasks, no worker settings."""
    app = _apps.get(settings.redis_url)
    if app is None:
        from celery import Celery

        app = Celery("check365-client", broker=settings.redis_url, set_as_current=False)
        app.conf.broker_transport_options = {"visibility_timeout": settings.broker_visibility_timeout_s}
        app.conf.broker_connection_retry_on_startup = True
        _apps[settings.redis_url] = app
    return app
