"""Celery's start-up banners stay out of a JSON log stream.

``celery worker`` and ``celery beat`` print a multi-line banner (ASCII art, the
configuration) to stdout before logging starts. With JSON logs a collector reading
the container's output would get those lines among the JSON ones, so they are left
out then, as ``--quiet`` would; the worker's "ready" line and beat's "Starting"
line are still logged, as JSON. On a terminal (console logs) the banners stay.

Logging is configured here already, before Celery's own set-up signal: Celery
warns (running as root, for example) before it, and Python's warnings reach the
log pipeline only once it is in place.
"""

from __future__ import annotations

from typing import Any

from celery.apps.beat import Beat as CeleryBeat
from celery.apps.worker import Worker as CeleryWorker

from worker.app import settings
from worker.runtime.logs import configure_logging, uses_json


class Worker(CeleryWorker):  # type: ignore[misc]  # Celery is untyped
    def on_before_init(self, quiet: bool = False, **kwargs: Any) -> None:
        configure_logging(settings)
        super().on_before_init(quiet=quiet or uses_json(settings), **kwargs)


class Beat(CeleryBeat):  # type: ignore[misc]  # Celery is untyped
    def __init__(self, *args: Any, quiet: bool = False, **kwargs: Any) -> None:
        configure_logging(settings)
        super().__init__(*args, quiet=quiet or uses_json(settings), **kwargs)
