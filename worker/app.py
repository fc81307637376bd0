"""The Celery app. ``celery -A worker worker|beat|inspect`` loads it through ``worker.app``.

A bad setting stops the process here with one line naming the variable, before
Celery prints anything else. Each process asks only for what it uses: beat and
Celery's control commands (compose's healthcheck runs ``celery -A worker inspect
ping``) start without the API key and the webhook secret; the worker refuses to.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from celery import Celery

from worker.errors import SettingsError
from worker.runtime.celeryconfig import celery_config
from worker.settings import Process, Settings, load_settings


def loading_process() -> Process:
    """The process loading the app, as Celery's command line names it.

    Celery loads ``-A worker`` inside its command group, which already knows its
    subcommand. Loaded any other way (``start_worker``, an import), the app is a
    worker's: it asks for everything.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.command.name != "celery" or ctx.invoked_subcommand in {None, "worker", "multi"}:
        return "worker"
    return "beat" if ctx.invoked_subcommand == "beat" else "cli"


def _settings() -> Settings:
    try:
        return load_settings(process=loading_process())
    except SettingsError as exc:
        print(f"check365-worker: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class App(Celery):  # type: ignore[misc]  # Celery is untyped
    """Celery whose ``worker`` and ``beat`` programs keep their banners out of JSON logs."""

    @property
    def Worker(self) -> Any:
        return self.subclass_with_self("worker.runtime.banner:Worker")

    @property
    def Beat(self) -> Any:
        return self.subclass_with_self("worker.runtime.banner:Beat")


settings = _settings()
app = App("check365")
app.config_from_object(celery_config(settings))
app.conf.update(include=["worker.runtime.tasks"])

import worker.runtime.signals  # noqa: E402 - connects logging and context signals
import worker.runtime.tasks  # noqa: E402,F401 - registers the tasks
