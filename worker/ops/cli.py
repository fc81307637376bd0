"""The ``check365-worker`` console script.

Its commands read settings as the ``cli`` process: they need neither the API key
nor the webhook secret, except where they use them (``verify``, ``doctor``).
Every read command takes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from check365_client import BrokerUnavailable, EndpointsFileError
from worker import __version__
from worker.delivery.events import iso_timestamp
from worker.errors import Check365WorkerError, InvalidSignature, InvalidWatchRequest, SettingsError
from worker.local.httpserver import Latency
from worker.local.simulator import FAULT_KINDS
from worker.runtime.celeryconfig import DELIVER_TASK, deliver_kwargs, delivery_queue
from worker.settings import Settings, load_settings


def _settings() -> Settings:
    return load_settings(process="cli")


def _stores(settings: Settings) -> tuple[Any, Any]:
    from worker.runtime.context import redis_client
    from worker.state.outbox import Outbox
    from worker.state.watches import WatchStore

    client = redis_client(settings)
    return WatchStore(client, state_ttl_s=settings.state_ttl_s), Outbox(client, state_ttl_s=settings.state_ttl_s)


def _when(ts: float | None) -> str | None:
    """A stored time as the CLI shows it everywhere, text and ``--json`` alike; None when unset."""
    return iso_timestamp(ts, milliseconds=True) if ts else None


def _part(index: int, count: int) -> dict[str, int]:
    return {"index": index, "count": count}


def _shown(value: object) -> str:
    """``value`` for a terminal: control characters (from Check365 or a receiver) escaped, ``-`` for nothing."""
    if value is None or value == "":
        return "-"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


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
    task_id = enqueue_watch(
        args.job_id, args.callback_url, metadata, settings=_settings(), endpoints_file=args.endpoints_file
    )
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
                "part": _part(event.part_index, event.part_count),
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
        print(f"watch {w['watch_id']}  job {w['job_id']}  -> {_shown(w['callback_url'])}")
        print(
            f"  state {w['state']}  outcome {_shown(w['outcome'])}  polls {w['polls']}  "
            f"last status {_shown(w['last_status'])} ({progress})"
        )
        print(
            f"  started {_shown(w['started_at'])}  next poll {_shown(w['next_poll'])}  deadline {_shown(w['deadline'])}"
        )
        for e in w["events"]:
            part = e.get("part")
            shown_part = f"{part['index']}/{part['count']}" if part else "-"
            print(f"  event {e['webhook_id']} {e.get('type', '')} part {shown_part}: {e['state']}")
            for a in e.get("attempts", []):
                print(_attempt_line(a))
    return 0


def _attempt_line(a: dict[str, Any]) -> str:
    if a.get("held"):
        # The breaker's history: the event waited here without an attempt.
        return f"    held at {_shown(a.get('at'))}: {_shown(a.get('error'))}"
    result = a.get("status_code") or a.get("error")
    return f"    attempt {a.get('attempt')} at {_shown(a.get('at'))}: {_shown(result)} ({a.get('duration_ms')} ms)"


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
            f"  {r['job_id']:<32} polls {r['polls']:>4}  {_shown(r['last_status'] or 'pending'):<12} {progress:>6}"
            f"  next {_shown(r['next_poll'])}"
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


# -- endpoints -------------------------------------------------------------------------------


def cmd_endpoints(args: argparse.Namespace) -> int:
    from worker.delivery.limits import default_limits
    from worker.ops.receivers import named_line, other_urls_line
    from worker.runtime.context import redis_client
    from worker.state.endpoints import EndpointState

    settings = _settings()
    if args.action == "recover":
        return _recover(args, settings)
    limits_for = default_limits(settings)
    state = EndpointState(redis_client(settings), due_key="", rearm_grace_s=settings.rearm_grace_s)
    now = time.time()
    rows: list[dict[str, Any]] = []
    for view in state.views(now, limit=args.limit):
        limits = limits_for(view.endpoint)
        rows.append(
            {
                "endpoint": view.endpoint,
                "breaker": view.state,
                "consecutive_failures": view.failures,
                "breaker_threshold": limits.breaker_threshold,
                "in_flight": view.in_flight,
                "max_in_flight": limits.max_in_flight,
                "waiting": view.waiting,
                "backlog": view.backlog,
                "oldest_pending_age_s": round(now - view.oldest_pending_at, 3) if view.oldest_pending_at else None,
                "opened_at": _when(view.opened_at) if view.state != "closed" else None,
                "next_probe": _when(view.probe_at) if view.state != "closed" else None,
                "last_error": view.last_error or None,
                "last_active_at": _when(view.last_active_at),
            }
        )
    _add_named(settings, rows, limits_for)
    if args.json:
        _print_json(rows)
        return 0
    print(f"{len(rows)} endpoint(s)")
    for r in rows:
        age = "-" if r["oldest_pending_age_s"] is None else f"{r['oldest_pending_age_s']:.0f}s"
        print(
            f"  {_shown(r['endpoint'])}  breaker {r['breaker']} ({r['consecutive_failures']}/{r['breaker_threshold']})"
            f"  in flight {r['in_flight']}/{r['max_in_flight']}  waiting {r['waiting']}  backlog {r['backlog']}"
            f"  oldest {age}"
        )
        if r["breaker"] != "closed":
            print(
                f"    open since {_shown(r['opened_at'])}  next probe {_shown(r['next_probe'])}"
                f"  last error {_shown(r['last_error'])}"
            )
        for named in r["named"]:
            print(named_line(named, _shown))
    if settings.webhook_endpoints_file:
        print(other_urls_line(settings))
    return 0


def _add_named(settings: Settings, rows: list[dict[str, Any]], limits_for: Any) -> None:
    """Each row with the named endpoints under its scheme, host and port (``named``); a row for
    each such key that has no state yet."""
    from worker.delivery.urls import endpoint_key
    from worker.ops.receivers import endpoint_rows

    by_key: dict[str, list[dict[str, Any]]] = {}
    for named in endpoint_rows(settings):
        by_key.setdefault(endpoint_key(named["url"]), []).append(named)
    for row in rows:
        row["named"] = by_key.pop(row["endpoint"], [])
    for key, named_rows in by_key.items():
        limits = limits_for(key)
        rows.append(
            {
                "endpoint": key,
                "breaker": "closed",
                "consecutive_failures": 0,
                "breaker_threshold": limits.breaker_threshold,
                "in_flight": 0,
                "max_in_flight": limits.max_in_flight,
                "waiting": 0,
                "backlog": 0,
                "oldest_pending_age_s": None,
                "opened_at": None,
                "next_probe": None,
                "last_error": None,
                "last_active_at": None,
                "named": named_rows,
            }
        )


def _recover(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.receivers import parse_since, recover

    _, outbox = _stores(settings)
    try:
        result = recover(settings, outbox, args.name, parse_since(args.since, time.time()), _replay)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        _print_json({**result, "since": _when(result["since"])})
    else:
        print(f"replayed {len(result['replayed'])} dead letter(s) of endpoint {args.name}")
        for webhook_id in result["replayed"]:
            print(f"  {webhook_id}")
        for skipped in result["not_replayed"]:
            print(f"  {skipped['webhook_id']} not replayed: {skipped['reason']}")
    return 0


# -- dead letters ---------------------------------------------------------------------------


def _replay(settings: Settings, outbox: Any, webhook_id: str) -> str | None:
    """Replay one dead letter; None when done, else why nothing happened."""
    from worker.intake.enqueue import client_app

    event = outbox.get(webhook_id)
    token = outbox.replay(webhook_id, time.time())
    if token is None:
        event = outbox.get(webhook_id)  # as of now: the replay script read it after the line above
        if event is None:
            return "no such event (never created, or expired)"
        if event.state == "delivered":
            return "already delivered: nothing to replay"
        if event.state == "active":
            return "not dead-lettered: still being delivered"
        return f"not dead-lettered (state {event.state})"
    queue = delivery_queue((event.queue if event else "") or settings.queue)
    client_app(settings).send_task(DELIVER_TASK, kwargs=deliver_kwargs(webhook_id, token), queue=queue)
    return None


def _event_dict(e: Any) -> dict[str, Any]:
    return {
        "webhook_id": e.webhook_id,
        "watch_id": e.watch_id,
        "job_id": e.job_id,
        "type": e.type,
        "part": _part(e.part_index, e.part_count),
        "callback_url": e.callback_url,
        "state": e.state,
        "tries": e.tries,
        "replays": e.replays,
        "last_error": e.last_error,
        "created_at": _when(e.created_at),
        "next_attempt": _when(e.due) if e.state == "active" else None,
        "queue": e.queue,
        "attempts": e.attempts,
    }


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
                        "part": _part(e.part_index, e.part_count),
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
                    f"  {r['webhook_id']}  {r['job_id']}  {r['type']} part {r['part']['index']}/{r['part']['count']}  "
                    f"{r['attempts']} attempts  last: {_shown(r['last_error'])}"
                )
        return 0
    if action == "show":
        e = outbox.get(args.webhook_id)
        if e is None:
            print(f"no event {args.webhook_id}", file=sys.stderr)
            return 1
        record = _event_dict(e)
        if args.json:
            _print_json(record)
        else:
            for key, value in record.items():
                if key == "part":
                    print(f"part: {value['index']}/{value['count']}")
                elif key != "attempts":
                    print(f"{key}: {_shown(value)}")
            for a in e.attempts:
                print(_attempt_line(a))
        return 0
    ids = outbox.dead_letters() if args.all else [args.webhook_id]
    replayed = []
    not_replayed = []
    for n, webhook_id in enumerate(ids, 1):
        why_not = _replay(settings, outbox, webhook_id)
        if why_not is None:
            replayed.append(webhook_id)
        else:
            not_replayed.append({"webhook_id": webhook_id, "reason": why_not})
        if not args.json and len(ids) > 1:
            # Progress for long lists, on stderr so that stdout keeps the summary.
            print(f"  {n}/{len(ids)} {webhook_id}", file=sys.stderr)
    if args.json:
        _print_json({"replayed": replayed, "not_replayed": not_replayed})
    else:
        print(f"replayed {len(replayed)} event(s)")
        for skipped in not_replayed:
            print(f"  {skipped['webhook_id']} not replayed: {skipped['reason']}")
    return 0 if replayed or args.all else 1


# -- verify ----------------------------------------------------------------------------------


def _read_file(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise UsageError(f"cannot read the {option} file: {_os_error(exc)}") from None


def _verify_secrets(args: argparse.Namespace) -> tuple[str, ...]:
    from worker.delivery.signing import decode_secret

    if not args.secret:
        secrets = _settings().webhook_secrets
        if not secrets:
            raise SettingsError("WEBHOOK_SECRET", "is needed to verify (or pass --secret)")
        return secrets
    # Settings are not read at all: a malformed WEBHOOK_SECRET must not block checking another one.
    secrets = tuple(args.secret.split())
    for secret in secrets:
        try:
            decode_secret(secret)
        except ValueError as exc:  # its message never quotes the secret
            raise UsageError(f"--secret is not usable: {exc}") from None
    return secrets


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a saved webhook request (headers file + raw body file) against the secret."""
    from worker.delivery.signing import verify

    secrets = _verify_secrets(args)
    raw = _read_file("--headers", args.headers).decode("utf-8", "replace")
    body = _read_file("--body", args.body)
    headers: dict[str, str] = {}
    try:
        loaded = json.loads(raw)
        headers = {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
    except ValueError:
        for line in raw.splitlines():
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip()] = value.strip()
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        # Without --check-time a saved request is judged as of its own timestamp.
        now = time.time() if args.check_time else float(lowered.get("webhook-timestamp") or time.time())
    except (ValueError, OverflowError):
        now = time.time()
    reason = None
    try:
        verify(secrets, headers, body, now=now)
    except InvalidSignature as exc:
        reason = str(exc)
    if args.json:
        _print_json({"valid": reason is None, "webhook_id": lowered.get("webhook-id"), "reason": reason})
    elif reason is None:
        print("valid: the signature matches this body and secret")
    else:
        print(f"invalid: {reason}")
    return 0 if reason is None else 1


# -- simulate / demo -------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from worker.local.simulator import FaultPlan, serve_forever

    faults = None
    if args.fault_rate > 0:
        faults = FaultPlan(
            rate=args.fault_rate,
            kinds=args.fault_kinds,
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
    try:
        serve_forever(
            api_key,
            args.host,
            args.port,
            faults,
            latency=args.latency,
            on_ready=lambda url: print(f"Check365 simulator on {url}", flush=True),
        )
    except OSError as exc:
        print(f"check365-worker: cannot listen on {args.host}:{args.port}: {_os_error(exc)}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.local.demo import run_demo

    return run_demo(timeout_s=args.timeout)


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when healthy: for container healthchecks."""
    import httpx

    from worker.ops.doctor import BEAT_SILENT_SWEEPS

    settings = _settings()
    if args.beat:
        from worker.runtime.context import redis_client
        from worker.state.beats import last_sweep

        client = redis_client(settings)
        try:
            seconds, micros = client.time()
            last = last_sweep(client)
        finally:
            client.close()
        limit = BEAT_SILENT_SWEEPS * settings.sweep_interval_s
        age = None if last is None else seconds + micros / 1e6 - last
        if age is None or age > limit:
            said = "no sweep has run yet" if age is None else f"the last sweep ran {age:.0f} s ago"
            print(f"unhealthy: {said} (limit {limit:g} s, {BEAT_SILENT_SWEEPS} x SWEEP_INTERVAL_S)")
            return 1
        print(f"healthy: the last sweep ran {age:.0f} s ago")
        return 0
    if settings.metrics_port == 0:
        raise SettingsError("METRICS_PORT", "is 0: the worker serves no health endpoint")
    path = "/healthz" if args.live else "/readyz"
    try:
        response = httpx.get(f"http://127.0.0.1:{settings.metrics_port}{path}", timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"unhealthy: no answer on port {settings.metrics_port} ({type(exc).__name__})")
        return 1
    print(("healthy: " if response.status_code == 200 else "unhealthy: ") + response.text.strip()[:500])
    return 0 if response.status_code == 200 else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from worker.ops.doctor import run_doctor

    return run_doctor(as_json=args.json)


# -- receivers' tools: send-test, endpoints ------------------------------------------------------


def cmd_send_test(args: argparse.Namespace) -> int:
    from worker.ops.receivers import send_test

    try:
        result = send_test(_settings(), endpoint=args.endpoint, url=args.url, kind=args.type)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        _print_json(result)
    else:
        where = f"endpoint {result['endpoint']}" if result["endpoint"] else "no endpoint: WEBHOOK_SECRET"
        answer = f"HTTP {result['status_code']}" if result["status_code"] else _shown(result["error"])
        print(f"{'delivered' if result['ok'] else 'FAILED'}: {result['type']} test event {result['webhook_id']}")
        print(f"  to {_shown(result['url'])} ({where}), signed with {' '.join(result['signed_with'])}")
        print(f"  answer: {answer} in {result['duration_ms']} ms")
    return 0 if result["ok"] else 1


def _add_receiver_commands(sub: Any) -> None:
    p = sub.add_parser("send-test", help="send a signed sample event (marked as a test, no job) to a receiver")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", metavar="NAME", help="an endpoint of WEBHOOK_ENDPOINTS_FILE")
    target.add_argument("--url", help="any callback URL (signed with its endpoint's secrets, else WEBHOOK_SECRET)")
    p.add_argument("--type", choices=["completed", "failed", "timed_out"], default="completed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_send_test)


# -- parser -----------------------------------------------------------------------------------


def _number(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {raw!r}")
    return value


def _fraction(raw: str) -> float:
    value = _number(raw)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {raw!r}")
    return value


def _latency(raw: str) -> Latency:
    try:
        return Latency.parse(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(raw: str) -> float:
    value = _number(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {raw!r}")
    return value


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {raw!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, got {raw!r}")
    return value


def _fault_kinds(raw: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in raw.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5]) or "none given"
        raise argparse.ArgumentTypeError(f"unknown fault kind ({shown}); choose from {','.join(FAULT_KINDS)}")
    return kinds


def _add_health_commands(sub: Any) -> None:
    """The commands that show how the pool and its receivers are doing."""
    p = sub.add_parser(
        "endpoints",
        help="each endpoint's breaker, in flight and backlog, its named endpoints and their secrets' fingerprints;"
        " 'recover NAME --since TIME' replays a named endpoint's dead letters",
    )
    p.add_argument("action", nargs="?", choices=["list", "recover"], default="list")
    p.add_argument("name", nargs="?", metavar="NAME", help="with recover: an endpoint of WEBHOOK_ENDPOINTS_FILE")
    p.add_argument("--since", metavar="TIME", help="with recover: ISO 8601 time, unix seconds, or ago (6h, 2d)")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_endpoints)

    p = sub.add_parser("doctor", help="check settings, Redis, the Check365 endpoint and key, the secret, clock")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "healthcheck",
        help="exit 0 when this host's worker is ready (its /readyz on METRICS_PORT), or with --beat when sweeps run",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--live", action="store_true", help="ask /healthz (the process serves) instead of /readyz")
    which.add_argument(
        "--beat",
        action="store_true",
        help="check that a sweep ran in the last 4 x SWEEP_INTERVAL_S (for beat's container)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the endpoint (default 5)")
    p.set_defaults(func=cmd_healthcheck)


def _add_enqueue(sub: Any) -> None:
    p = sub.add_parser("enqueue", help="validate and enqueue a watch")
    p.add_argument("job_id")
    p.add_argument("callback_url")
    p.add_argument("--metadata", help="a JSON object echoed in every event (at most 4 KiB)")
    p.add_argument(
        "--endpoints-file",
        help="refuse a callback URL that matches none of this file's endpoints (default: WEBHOOK_ENDPOINTS_FILE,"
        " refusing only with WEBHOOK_ENDPOINTS_ONLY=true)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_enqueue)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="check365-worker",
        description="Watch Check365 bulk jobs and deliver their results as signed webhooks.",
    )
    parser.add_argument("--version", action="version", version=f"check365-worker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_enqueue(sub)

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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    _add_health_commands(sub)
    _add_receiver_commands(sub)

    p = sub.add_parser("simulate", help="serve a local Check365 simulator")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument(
        "--port", type=_port, default=8365, help="port to listen on, 0 for any free one (default: %(default)s)"
    )
    p.add_argument("--api-key", help="the key it accepts (default: CHECK365_API_KEY, else demo-key)")
    p.add_argument(
        "--fault-rate",
        type=_fraction,
        default=0.0,
        help="share of status requests that meet a fault, from 0 to 1 (default: %(default)s)",
    )
    p.add_argument(
        "--fault-kinds",
        type=_fault_kinds,
        default=FAULT_KINDS,
        help=f"comma-separated faults to draw from (default: all of {','.join(FAULT_KINDS)})",
    )
    p.add_argument(
        "--seed", type=int, default=1, help="seed of the fault draws, for repeatable runs (default: %(default)s)"
    )
    p.add_argument(
        "--slow-s", type=_seconds, default=5.0, help="how long a 'slow' fault delays its answer (default: %(default)s)"
    )
    p.add_argument(
        "--retry-after-s",
        type=_seconds,
        default=1.0,
        help="the Retry-After of a '429' fault, in seconds (default: %(default)s)",
    )
    p.add_argument(
        "--latency",
        type=_latency,
        default="0",
        help="how long each status answer takes: SECONDS, or SECONDS~TAIL for a log-normal spread "
        "(for example 0.25~0.5: one answer in a hundred over 0.8 s) (default: at once)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="run the whole system locally and watch a few jobs end to end")
    p.add_argument("--timeout", type=float, default=90.0)
    p.set_defaults(func=cmd_demo)
    return parser


def _check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, as usage errors, the combinations argparse cannot express."""
    if args.command == "endpoints":
        if args.action == "recover" and not (args.name and args.since):
            parser.error("endpoints recover needs NAME and --since TIME")
        if args.action == "list" and (args.name or args.since):
            parser.error("NAME and --since go with endpoints recover")
    if args.command == "dead-letters":
        if args.action == "replay" and args.all and args.webhook_id:
            parser.error("dead-letters replay takes a WEBHOOK_ID or --all, not both")
        if args.action == "replay" and not (args.all or args.webhook_id):
            parser.error("dead-letters replay needs a WEBHOOK_ID or --all")
        if args.action == "show" and not args.webhook_id:
            parser.error("dead-letters show needs a WEBHOOK_ID")
        if args.action != "replay" and args.all:
            parser.error(f"--all applies to dead-letters replay, not {args.action}")
        if args.action == "list" and args.webhook_id:
            parser.error("dead-letters list takes no WEBHOOK_ID")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_combinations(parser, args)
    try:
        code = int(args.func(args))
        # Flushed here, so that a closed pipe is reported like any other failure to write.
        sys.stdout.flush()
        return code
    except UsageError as exc:
        return _fail(args, 2, "usage", str(exc))
    except SettingsError as exc:
        return _fail(args, 2, "configuration", f"configuration error: {exc}", variable=exc.variable)
    except InvalidWatchRequest as exc:
        return _fail(args, 2, "invalid_request", f"invalid request: {exc}", field=exc.field)
    except EndpointsFileError as exc:
        return _fail(args, 2, "configuration", f"endpoints file: {exc}")
    except Check365WorkerError as exc:
        return _fail(args, 1, "error", str(exc))
    except BrokerUnavailable as exc:
        return _fail(args, 1, "redis", f"cannot reach Redis: {exc}")
    except (KombuOperationalError, RedisError) as exc:
        # Never print the URL: it may carry the Redis password.
        return _fail(args, 1, "redis", f"cannot reach Redis: {type(exc).__name__}: {_first_line(exc)}")
    except BrokenPipeError:
        # The reader went away (``| head``): nothing more to say to it, and Python's
        # flush at exit must not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        return _fail(args, 1, "os", _os_error(exc))
    except KeyboardInterrupt:
        return 130


class UsageError(Exception):
    """A command's arguments cannot be used (exit status 2, like argparse's own errors)."""


def _fail(args: argparse.Namespace, status: int, kind: str, message: str, **fields: str) -> int:
    """Report an error: on stdout as ``{"error": ...}`` with ``--json``, else on stderr; return ``status``."""
    if getattr(args, "json", False):
        _print_json({"error": {"kind": kind, "message": message, **fields}})
    else:
        print(f"check365-worker: {message}", file=sys.stderr)
    return status


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or type(exc).__name__}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return re.sub(r"rediss?://\S+", "<REDIS_URL>", text)[:200]


if __name__ == "__main__":
    sys.exit(main())
