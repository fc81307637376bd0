"""check365-worker: watch Check365 bulk jobs and deliver their results as signed webhooks.

``celery -A worker`` finds the Celery app as ``worker.app``. It is loaded lazily so
that importing the enqueue helper or the errors does not build the app.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        from worker.app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
