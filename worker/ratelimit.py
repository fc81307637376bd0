"""One request rate towards Check365 for the whole pool, kept in Redis.

A GCRA limiter (the "theoretical arrival time" form of a token bucket) whose
clock is Redis's own ``TIME``, so workers on hosts with skewed clocks still
share one schedule. A ``Retry-After`` from Check365 blocks the whole pool until
it has passed: the server asked the API key to wait, not one worker.
"""

from __future__ import annotations

import redis

from worker.store import PREFIX

RATE_KEY = f"{PREFIX}ratelimit:check365"
BLOCKED_KEY = f"{PREFIX}blocked_until"

# KEYS: rate key, blocked key; ARGV: interval (s)
# Returns the seconds to wait as a string ('0' = go ahead, the slot is taken).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local blocked = tonumber(redis.call('GET', KEYS[2]) or '0')
if blocked > now then return tostring(blocked - now) end
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > 0 then return tostring(tat - now) end
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', math.ceil(interval * 1000) + 1000)
return '0'
"""

# KEYS: blocked key; ARGV: seconds. Only ever extends the block.
_BLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local untilt = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if untilt > current then
  redis.call('SET', KEYS[1], tostring(untilt), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return tostring(untilt - now)
"""


class RateLimiter:
    def __init__(self, client: redis.Redis, max_rps: float) -> None:
        self.interval = 1.0 / max_rps
        self._acquire = client.register_script(_ACQUIRE)
        self._block = client.register_script(_BLOCK)

    def acquire(self) -> float:
        """Take a request slot now (return 0.0) or say how many seconds to wait."""
        wait = self._acquire(keys=[RATE_KEY, BLOCKED_KEY], args=[repr(self.interval)])
        return max(0.0, float(wait))

    def block(self, seconds: float) -> None:
        """Hold every worker's requests back for ``seconds`` (a Retry-After)."""
        if seconds > 0:
            self._block(keys=[BLOCKED_KEY], args=[repr(seconds)])
