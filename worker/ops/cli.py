"""The ``check365-worker`` console script.

Client commands read settings with ``role="client"``: they need neither the API
key nor the webhook secret, except where they use them (``verify``, ``doctor``).
Every read command takes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from worker.errors import Check365WorkerError, InvalidSignature, InvalidWatchRequest, SettingsError
from worker.runtime.celeryconfig import DELIVER_TASK
from worker.settings import Settings, load_settings


def _settings(role: str = "client") -> Settings:
    return load_settings(role=role)  # type: ignore[arg-type]


def _stores(settings: Settings) -> tuple[Any, Any]:
    from worker.runtime.context import redis_client
    from worker.state.outbox import Outbox
    from worker.state.watches import WatchStore

    client = redis_client(settings)
    return WatchStore(client, state_ttl_s=settings.state_ttl_s), Outbox(client, state_ttl_s=settings.state_ttl_s)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# -- enqueue ------------------------------------------------------------------------------


def cmd_enqueue(args: argparse.Namespace) -> int:
    from worker.intake.enqueue import enqueue_watch

    metadata = None
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise InvalidWatchRequest("metadata", f"is not valid JSON ({exc.msg})") from None
    task_id = enqueue_watch(args.job_id, args.callback_url, metadata, settings=_settings())
    if args.json:
        _print_json({"task_id": task_id, "job_id": args.job_id})
    else:
        print(f"enqueued watch of job {args.job_id} (task {task_id})")
    return 0


# -- status / watches / cancel ----------------------------------------------------------


def _watch_dict(watch: Any, outbox: Any) -> dict[str, Any]:
    events = []
    for webhook_id in watch.events:
        event = outbox.get(webhook_id)
        if event is None:
            events.append({"webhook_id": webhook_id, "state": "expired"})
            continue
        events.append(
            {
                "webhook_id": webhook_id,
                "type": event.type,
                "part": f"{event.part_index}/{event.part_count}",
                "state": event.state,
                "tries": event.tries,
                "last_error": event.last_error,
                "attempts": event.attempts,
            }
        )
    return {
        "watch_id": watch.watch_id,
        "job_id": watch.job_id,
        "callback_url": watch.callback_url,
        "state": watch.state,
        "outcome": watch.outcome,
        "polls": watch.polls,
        "last_status": watch.last_status,
        "last_progress": watch.last_progress,
        "started_at": _when(watch.started_at),
        "deadline": _when(watch.deadline),
        "next_poll": _when(watch.due) if watch.state == "active" else None,
        "finished_at": _when(watch.finished_at),
        "metadata": watch.metadata,
        "events": events,
    }


def cmd_status(args: argparse.Namespace) -> int:
    watches, outbox = _stores(_settings())
    found = [_watch_dict(w, outbox) for w in watches.for_job(args.job_id)]
    if args.json:
        _print_json(found)
        return 0 if found else 1
    if not found:
        print(f"no watch known for job {args.job_id}", file=sys.stderr)
        return 1
    for w in found:
        progress = "-" if w["last_progress"] is None else f"{w['last_progress']:g}%"
        print(f"watch {w['watch_id']}  job {w['job_id']}  -> {w['callback_url']}")
        print(
            f"  state {w['state']}  outcome {w['outcome'] or '-'}  polls {w['polls']}  "
            f"last status {w['last_status'] or '-'} ({progress})"
        )
        print(f"  started {w['started_at']}  next poll {w['next_poll'] or '-'}  deadline {w['deadline']}")
        for e in w["events"]:
            print(f"  event {e['webhook_id']} {e.get('type', '')} part {e.get('part', '-')}: {e['state']}")
            for a in e.get("attempts", []):
                result = a.get("status_code") or a.get("error")
                print(f"    attempt {a.get('attempt')} at {a.get('at')}: {result} ({a.get('duration_ms')} ms)")
    return 0


def cmd_watches(args: argparse.Namespace) -> int:
    watches, _ = _stores(_settings())
    rows = []
    for watch_id in watches.active_ids(limit=args.limit):
        w = watches.get(watch_id)
        if w is None or (args.job and args.job not in w.job_id):
            continue
        rows.append(
            {
                "watch_id": w.watch_id,
                "job_id": w.job_id,
                "polls": w.polls,
                "last_status": w.last_status,
                "last_progress": w.last_progress,
                "next_poll": _when(w.due),
                "callback_url": w.callback_url,
            }
        )
    if args.json:
        _print_json(rows)
        return 0
    print(f"{len(rows)} active watch(es)")
    for r in rows:
        progress = "-" if r["last_progress"] is None else f"{r['last_progress']:g}%"
        print(
            f"  {r['job_id']:<32} polls {r['polls']:>4}  {r['last_status'] or 'pending':<12} {progress:>6}"
            f"  next {r['next_poll']}"
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    watches, _ = _stores(_settings())
    cancelled = [w.watch_id for w in watches.for_job(args.job_id) if watches.cancel(w.watch_id)]
    if args.json:
        _print_json({"cancelled": cancelled})
    else:
        print(f"cancelled {len(cancelled)} active watch(es) of job {args.job_id}")
    return 0 if cancelled else 1


# -- dead letters ---------------------------------------------------------------------------


def _replay(settings: Settings, outbox: Any, webhook_id: str) -> bool:
    from worker.intake.enqueue import client_app

    event = outbox.get(webhook_id)
    token = outbox.replay(webhook_id, time.time())
    if token is None:
        return False
    queue = (event.queue if event else "") or settings.queue
    client_app(settings).send_task(DELIVER_TASK, kwargs={"webhook_id": webhook_id, "token": token}, queue=queue)
    return True


def cmd_dead_letters(args: argparse.Namespace) -> int:
    settings = _settings()
    _, outbox = _stores(settings)
    action = args.action
    if action == "list":
        rows = []
        for webhook_id in outbox.dead_letters():
            e = outbox.get(webhook_id)
            if e is not None:
                rows.append(
                    {
                        "webhook_id": webhook_id,
                        "job_id": e.job_id,
                        "type": e.type,
                        "part": f"{e.part_index}/{e.part_count}",
                        "attempts": len(e.attempts),
                        "last_error": e.last_error,
                        "callback_url": e.callback_url,
                    }
                )
        if args.json:
            _print_json(rows)
        else:
            print(f"{len(rows)} dead-lettered event(s)")
            for r in rows:
                print(
                    f"  {r['webhook_id']}  {r['job_id']}  {r['type']} part {r['part']}  "
                    f"{r['attempts']} attempts  last: {r['last_error']}"
                )
        return 0
    if action == "show":
        e = outbox.get(args.webhook_id)
        if e is None:
            print(f"no event {args.webhook_id}", file=sys.stderr)
            return 1
        record = {**e.__dict__}
        if args.json:
            _print_json(record)
        else:
            for key, value in record.items():
                if key != "attempts":
                    print(f"{key}: {value}")
            for a in e.attempts:
                print(
                    f"  attempt {a.get('attempt')} at {a.get('at')}: "
                    f"{a.get('status_code') or a.get('error')} ({a.get('duration_ms')} ms)"
                )
        return 0
    ids = outbox.dead_letters() if args.all else [args.webhook_id]
    if not args.all and not args.webhook_id:
        print("dead-letters replay needs a WEBHOOK_ID or --all", file=sys.stderr)
        return 2
    replayed = []
    for n, webhook_id in enumerate(ids, 1):
        if _replay(settings, outbox, webhook_id):
            replayed.append(webhook_id)
        if not args.json and len(ids) > 1:
            # Progress for long lists, on stderr so that stdout keeps the one-line summary.
            print(f"  {n}/{len(ids)} {webhook_id}", file=sys.stderr)
    if args.json:
        _print_json({"replayed": replayed})
    else:
        print(f"replayed {len(replayed)} event(s)")
    return 0 if replayed or args.all else 1


# -- verify ----------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a saved webhook request (headers file + raw body file) against the secret."""
    from worker.delivery.signing import verify

    settings = _settings()
    secrets = tuple(args.secret.split()) if args.secret else settings.webhook_secrets
    if not secrets:
        raise SettingsError("WEBHOOK_SECRET", "is needed to verify (or pass --secret)")
    headers: dict[str, str] = {}
    with open(args.headers, encoding="utf-8") as fh:
        raw = fh.read()
    try:
        loaded = json.loads(raw)
        headers = {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
    except ValueError:
        for line in raw.splitlines():
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip()] = value.strip()
    with open(args.body, "rb") as fh:
        body = fh.read()
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        # Without --check-time a saved request is judged as of its own timestamp.
        now = time.time() if args.check_time else float(lowered.get("webhook-timestamp") or time.time())
    except ValueError:
        now = time.time()
    try:
        verify(secrets, headers, body, now=now)
    except ValueError as exc:  # a malformed secret
        raise SettingsError("WEBHOOK_SECRET", f"is not usable: {exc}") from None
    except InvalidSignature as exc:
        print(f"invalid: {exc}")
        return 1
    print("valid: the signature matches this body and secret")
    return 0


# -- simulate / demo -------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from worker.local.simulator import FaultPlan, serve_forever

    faults = None
    if args.fault_rate > 0:
        faults = FaultPlan(
            rate=args.fault_rate,
            kinds=tuple(args.fault_kinds.split(",")),
            seed=args.seed,
            slow_s=args.slow_s,
            retry_after_s=args.retry_after_s,
        )
    # The key may come from the environment so that it stays off the command line.
    api_key = args.api_key or _settings().api_key or "demo-key"

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Containers stop with SIGTERM: shut down as cleanly as on Ctrl-C.
    signal.signal(signal.SIGTERM, interrupt)
    serve_forever(
        api_key, args.host, args.port, faults, on_ready=lambda url: print(f"Check365 simulator on {url}", flush=True)
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.local.demo import run_demo

    return run_demo(timeout_s=args.timeout)


def cmd_doctor(args: argparse.Namespace) -> int:
    from worker.ops.doctor import run_doctor

    return run_doctor(as_json=args.json)


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="check365-worker",
        description="Watch Check365 bulk jobs and deliver their results as signed webhooks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enqueue", help="validate and enqueue a watch")
    p.add_argument("job_id")
    p.add_argument("callback_url")
    p.add_argument("--metadata", help="a JSON object echoed in every event (at most 4 KiB)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("status", help="a job's watches: polls, progress, next poll, outcome, deliveries")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("watches", help="list active watches")
    p.add_argument("--job", help="only jobs whose id contains this text")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_watches)

    p = sub.add_parser("cancel", help="stop the active watches of a job, without an event")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("dead-letters", help="list, show or replay dead-lettered events")
    p.add_argument("action", choices=["list", "show", "replay"])
    p.add_argument("webhook_id", nargs="?")
    p.add_argument("--all", action="store_true", help="with replay: every dead letter")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dead_letters)

    p = sub.add_parser("verify", help="check a saved webhook request against the secret")
    p.add_argument("--headers", required=True, help="file with the headers (JSON object or 'Name: value' lines)")
    p.add_argument("--body", required=True, help="file with the raw body, byte for byte")
    p.add_argument("--secret", help="whsec_... (default: WEBHOOK_SECRET)")
    p.add_argument("--check-time", action="store_true", help="also reject timestamps older than 5 minutes")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("doctor", help="check settings, Redis, the Check365 endpoint and key, the secret, clock")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("simulate", help="serve a local Check365 simulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8365)
    p.add_argument("--api-key", help="the key it accepts (default: CHECK365_API_KEY, else demo-key)")
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--fault-kinds", default="5xx,429,slow,malformed,success_false,truncated,drop")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--slow-s", type=float, default=5.0)
    p.add_argument("--retry-after-s", type=float, default=1.0)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="run the whole system locally and watch a few jobs end to end")
    p.add_argument("--timeout", type=float, default=90.0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"check365-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    except InvalidWatchRequest as exc:
        print(f"check365-worker: invalid request: {exc}", file=sys.stderr)
        return 2
    except Check365WorkerError as exc:
        print(f"check365-worker: {exc}", file=sys.stderr)
        return 1
    except (KombuOperationalError, RedisError, OSError) as exc:
        # Never print the URL: it may carry the Redis password.
        print(f"check365-worker: cannot reach Redis: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return re.sub(r"rediss?://\S+", "<REDIS_URL>", text)[:200]


if __name__ == "__main__":
    sys.exit(main())
