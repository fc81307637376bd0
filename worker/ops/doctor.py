"""``check365-worker doctor``: check what a deployment needs, one line per check."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from worker.errors import Check365Misconfigured, Check365Rejected, RetryableError, SettingsError
from worker.settings import Settings, load_settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _settings_check() -> tuple[Check, Settings | None]:
    try:
        settings = load_settings(process="worker")
    except SettingsError as exc:
        return Check("settings", False, str(exc)), None
    detail = f"queue {settings.queue}, {len(settings.webhook_secrets)} webhook secret(s)"
    return Check("settings", True, detail), settings


def _redis_check(settings: Settings) -> tuple[Check, Check]:
    from worker.runtime.context import redis_client

    client = redis_client(settings)
    try:
        started = time.monotonic()
        client.ping()
        latency = (time.monotonic() - started) * 1000
        seconds, micros = client.time()
        skew = time.time() - (seconds + micros / 1e6)
        info = client.info("persistence")
        aof = "AOF on" if info.get("aof_enabled") else "AOF off (a restart loses queued work)"
    except Exception as exc:
        return Check("redis", False, f"unreachable: {type(exc).__name__}"), Check("clock", False, "no Redis")
    finally:
        client.close()
    clock = Check("clock", abs(skew) < 2.0, f"skew against Redis {skew:+.3f} s")
    return Check("redis", True, f"ping {latency:.1f} ms, {aof}"), clock


def _check365_check(settings: Settings) -> Check:
    from worker.polling.check365 import fetch_status, make_client

    client = make_client(settings)
    try:
        # A job id that cannot exist: Check365's own not-found answer proves the key is
        # accepted (any other 404 is classified as not Check365's).
        fetch_status(client, settings, "check365-worker-doctor-probe")
    except Check365Rejected as exc:
        if exc.reason == "unauthorized":
            return Check("check365", False, "the API key is refused")
        return Check("check365", True, f"endpoint answers, key accepted ({exc.reason} for a probe job)")
    except Check365Misconfigured as exc:
        return Check("check365", False, f"not Check365: {exc}")
    except RetryableError as exc:
        return Check("check365", False, f"endpoint unavailable: {exc}")
    finally:
        client.close()
    return Check("check365", True, "endpoint answers, key accepted")


def run_doctor(*, as_json: bool = False) -> int:
    checks: list[Check] = []
    settings_check, settings = _settings_check()
    checks.append(settings_check)
    if settings is not None:
        checks.extend(_redis_check(settings))
        checks.append(_check365_check(settings))
    ok = all(c.ok for c in checks)
    if as_json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            print(f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    return 0 if ok else 1
