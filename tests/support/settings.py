"""The one way tests build ``Settings``: test secrets, then the test's own values.

Nothing comes from the developer's environment, so a shell's ``REDIS_URL`` or
``LOG_LEVEL`` cannot change what a test runs against.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from worker.settings import Process, Settings, load_settings

TEST_API_KEY = "ck365_live_9fQ2xZrT7wLmB4vK"
TEST_SECRET = "whsec_" + base64.b64encode(bytes(range(24))).decode()
TEST_SECRETS: Mapping[str, str] = {"CHECK365_API_KEY": TEST_API_KEY, "WEBHOOK_SECRET": TEST_SECRET}


def make_settings(
    env: Mapping[str, str | None] | None = None, /, *, process: Process = "worker", **overrides: str | None
) -> Settings:
    """Settings from the test secrets, then ``env``, then ``overrides`` (a value of None removes a variable)."""
    values: dict[str, str | None] = {**TEST_SECRETS, **(env or {}), **overrides}
    return load_settings({k: v for k, v in values.items() if v is not None}, process=process)
