"""A receiver for check365-worker webhooks, with Flask and the `standardwebhooks` package.

    pip install -r requirements.txt
    WEBHOOK_SECRET=whsec_... PORT=8000 python app.py

It does the four things every receiver must:

1. verify the signature over the raw body, byte for byte, before parsing anything;
2. ignore a webhook-id it has already handled (delivery is at-least-once);
3. reassemble a big job's parts, which may arrive in any order;
4. answer 2xx quickly once the event is safely handled (here 204), and 5xx if it
   could not be handled, so that the worker retries it later.

State lives in memory to keep the example short. In production keep it in your
database: insert the webhook-id into a table with a unique key in the same
transaction as the event's effects, so that a crash between the two cannot lose
or double an event, and several receiver processes share what was seen.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import sys
import threading
from typing import Any

from flask import Flask, Response, jsonify, request
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from werkzeug.serving import run_simple

PATH = "/webhooks/check365"
# A part carries at most WEBHOOK_MAX_RESULTS_PER_PART results (1000 by default,
# about 250 KB); this is ample, and bounds what a stranger can make us read.
MAX_BODY = 16 * 1024 * 1024


def load_secret() -> str:
    """WEBHOOK_SECRET, checked at start-up: a wrong one would answer 400 to every webhook."""
    secret = os.environ.get("WEBHOOK_SECRET", "").strip()
    problem = None
    if not secret:
        problem = "is not set: use your endpoint's secret (whsec_...)"
    elif not secret.startswith("whsec_") or " " in secret:
        problem = "must be one secret of the form whsec_<base64 key>, as the worker has it"
    else:
        try:
            if not base64.b64decode(secret.removeprefix("whsec_"), validate=True):
                problem = "has an empty key after whsec_"
        except (binascii.Error, ValueError):
            problem = "must be base64 after whsec_"
    if problem is not None:
        # The value itself is never printed: it is a secret, even when malformed.
        print(f"WEBHOOK_SECRET {problem}", file=sys.stderr)
        sys.exit(2)
    return secret


def fingerprint(secret: str) -> str:
    """What `check365-worker endpoints` shows for this secret: compare the two, never the secret itself."""
    return "sha256:" + hashlib.sha256(base64.b64decode(secret.removeprefix("whsec_"))).hexdigest()[:16]


SECRET = load_secret()
app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
webhook = Webhook(SECRET)

# The reference library's reasons, as the answer's error (anything else is a bad signature).
REFUSALS = {
    "Missing required headers": "missing webhook headers",
    "Message timestamp too old": "stale timestamp (check this host's clock)",
    "Message timestamp too new": "timestamp in the future (check this host's clock)",
}

lock = threading.Lock()
seen: set[str] = set()  # handled webhook-ids: use a table with a unique key in production
accepted: list[dict[str, Any]] = []  # what GET /events shows
parts: dict[str, dict[int, list[dict[str, Any]]]] = {}  # jobId -> part.index -> results
jobs: dict[str, dict[str, Any]] = {}  # jobId -> its outcome, once known


def handle(event: dict[str, Any]) -> bool:
    """Apply one verified event; True when it finished its job."""
    data = event["data"]
    job_id = data["jobId"]
    if event["type"] == "bulk_validation.completed":
        job_parts = parts.setdefault(job_id, {})
        job_parts[data["part"]["index"]] = data["results"]
        if len(job_parts) < data["part"]["count"]:
            return False
        results = [r for index in sorted(job_parts) for r in job_parts[index]]
        del parts[job_id]
        # Your code takes over here: `results` is every result of the job, in
        # Check365's order, and data["metadata"] is what was given at enqueue.
        jobs[job_id] = {"type": event["type"], "results": len(results), "emails": [r["email"] for r in results]}
        return True
    # bulk_validation.failed (see data["reason"]) or bulk_validation.timed_out (data["status"],
    # data["progress"]): the job will never deliver results through this watch.
    jobs[job_id] = {"type": event["type"], "reason": data.get("reason")}
    return True


@app.post(PATH)
def receive() -> tuple[Response | str, int]:
    body = request.get_data()  # the raw bytes: re-serialised JSON would not match the signature
    try:
        event = webhook.verify(body, dict(request.headers))
    except WebhookVerificationError as exc:
        return jsonify(error=REFUSALS.get(str(exc), "invalid signature")), 400
    except ValueError:
        # The signature matched, but the body is not UTF-8 JSON.
        return jsonify(error="invalid body"), 400
    webhook_id = request.headers["webhook-id"]
    with lock:
        if webhook_id in seen:
            return "", 204  # a retry of an event already handled: acknowledge, do nothing
        try:
            finished = handle(event)
        except Exception as exc:  # unexpected content: let the worker retry rather than lose it
            app.logger.exception("could not handle %s", webhook_id)
            return jsonify(error=type(exc).__name__), 500
        seen.add(webhook_id)
        part = event["data"].get("part")
        record = {
            "webhookId": webhook_id,
            "type": event["type"],
            "jobId": event["data"]["jobId"],
            "part": part,
            "results": len(event["data"].get("results") or []),
            "jobFinished": finished,
        }
        accepted.append(record)
        # Under the lock: print() writes the line and its newline separately, and two
        # requests printing at once would share a line.
        print(json.dumps(record), flush=True)
    return "", 204


@app.get("/events")
def events() -> Response:
    # A window for demos and tests; remove it (or protect it) in production.
    with lock:
        return jsonify(accepted=list(accepted), jobs=dict(jobs))


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    # Loopback by default; set HOST=0.0.0.0 in a container. For production, serve
    # `app` with a WSGI server such as gunicorn (one process, or a shared database).
    host = os.environ.get("HOST", "127.0.0.1")
    listening = {"listening": f"http://{host}:{port}{PATH}", "secret": fingerprint(SECRET)}
    print(json.dumps(listening), file=sys.stderr, flush=True)
    # Werkzeug's server directly rather than app.run(), whose banner would go to
    # stdout: stdout carries only the JSON lines of accepted events.
    run_simple(host, port, app, threaded=True)
