"""Names shared by producers and the worker: the task, the default queue, the Redis keys.

They are part of the deployed state: messages in flight and watches stored in Redis
must survive a rolling upgrade, so none of them changes. The worker imports them from
here (this package imports nothing of the worker). docs/design.md describes every key.
"""

from __future__ import annotations

import hashlib

WATCH_TASK = "check365.watch_bulk_job"
DEFAULT_QUEUE = "check365"

PREFIX = "check365:"


def watch_id_for(message_id: str) -> str:
    """The id of the watch a start message creates: the same for every delivery of that message."""
    return "w_" + hashlib.sha256(message_id.encode()).hexdigest()[:20]


def watch_key(watch_id: str) -> str:
    """The watch's hash."""
    return f"{PREFIX}watch:{watch_id}"


def active_key(job_id: str, callback_url: str) -> str:
    """The watch id currently active for the pair: the lock that makes a second enqueue start nothing."""
    digest = hashlib.sha256(f"{job_id}\x00{callback_url}".encode()).hexdigest()[:32]
    return f"{PREFIX}active:{digest}"


def job_index_key(job_id: str) -> str:
    """The set of every watch id started for a job."""
    return f"{PREFIX}job:{job_id}"
