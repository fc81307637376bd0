"""The Celery app. ``celery -A worker worker|beat`` loads it through ``worker.app``.

A bad setting stops the process here with one line naming the variable, before
Celery prints anything else.
"""

from __future__ import annotations

import sys

from celery import Celery

from worker.errors import SettingsError
from worker.runtime.celeryconfig import celery_config
from worker.settings import Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings(role="worker")
    except SettingsError as exc:
        print(f"check365-worker: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


settings = _settings()
app = Celery("check365")
app.config_from_object(celery_config(settings))
app.conf.update(include=["worker.runtime.tasks"])

import worker.runtime.signals  # noqa: E402 - connects logging and context signals
import worker.runtime.tasks  # noqa: E402,F401 - registers the tasks
