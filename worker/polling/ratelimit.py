"""One request rate towards Check365 for the whole pool, kept in Redis.

A GCRA limiter (the "theoretical arrival time" form of a token bucket) whose
clock is Redis's own ``TIME``, so workers on hosts with skewed clocks still
share one schedule. A ``Retry-After`` from Check365 blocks the whole pool until
it has passed: the server asked the API key to wait, not one worker.

A caller that is refused a slot is not told "try again when the next slot is
free": all of them would come back at that same instant and all but one would be
refused again (measured with 500 watches on three workers at 20 requests/s: 9 to
14 throttled task runs per request, the pool busy with nothing else). It is given
a turn instead: the slot after those of the callers already told to wait, so that
callers come back one slot apart and most find their slot free (measured: 0.9
throttled runs per request). A turn is a hint, not a reservation (the limiter does
not know who comes back), so the rate itself is enforced by the GCRA alone. Turns
of callers that never come for them (their poll gap was shorter than their wait)
show up as slots nobody took, and the queue of turns is shortened by as many.
"""

from __future__ import annotations

import redis

from check365_client.names import PREFIX

RATE_KEY = f"{PREFIX}ratelimit:check365"
BLOCKED_KEY = f"{PREFIX}blocked_until"
TURNS_KEY = f"{PREFIX}ratelimit:turns"
KEY_REFUSED_KEY = f"{PREFIX}key_refused_since"

# A caller coming back for its turn may find the previous one came a little late.
# Letting a request through up to half a slot early keeps those turns from being
# refused and re-queued, and keeps the most requests in any window of w seconds at
# ceil(w * rate) + 1, the bound of a limiter without tolerance.
TOLERANCE_SLOTS = 0.5
# Turns are handed out at most this far ahead; a caller beyond is told to come back
# then. It bounds how long a queue of stale turns (callers whose poll gap capped
# their wait and who came back early) can delay callers once the crowd is gone.
MAX_TURN_AHEAD_S = 60.0

# KEYS: rate key, blocked key, turns key; ARGV: interval (s), tolerance (s), max turn ahead (s)
# Returns the seconds to wait as a string ('0' = go ahead, the slot is taken).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local ahead = tonumber(ARGV[3])
local blocked = tonumber(redis.call('GET', KEYS[2]) or '0')
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local turns = tonumber(redis.call('GET', KEYS[3]) or '0')
if blocked <= now and tat - tonumber(ARGV[2]) <= now then
  -- Whole slots since the last request (or the end of a Retry-After) that nobody took.
  local idle = math.floor((now - math.max(tat, blocked)) / interval)
  if tat < now then tat = now end
  -- Kept well past the furthest turn, so that an expired key never hides idle slots.
  redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', math.ceil((interval + 2 * ahead) * 1000))
  if idle > 0 and turns > now then
    local left = math.max(turns - idle * interval, now)
    redis.call('SET', KEYS[3], tostring(left), 'PX', math.ceil((left - now) * 1000) + 1000)
  end
  return '0'
end
-- Refused: the next turn after everyone already waiting, after any Retry-After.
local turn = math.max(tat, blocked, turns)
if turn - now > ahead then return tostring(ahead) end
redis.call('SET', KEYS[3], tostring(turn + interval), 'PX', math.ceil((turn + interval - now) * 1000) + 1000)
return tostring(turn - now)
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

# KEYS: refused-since key, blocked key; ARGV: grace (s), pause (s)
# Returns the seconds since the API key was first refused in this streak of refusals.
_KEY_REFUSED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local grace, pause = tonumber(ARGV[1]), tonumber(ARGV[2])
local since = tonumber(redis.call('GET', KEYS[1]) or 'x') or now
redis.call('SET', KEYS[1], tostring(since), 'PX', math.ceil((3 * pause + 1) * 1000))
local refused_for = now - since
if refused_for < grace and pause > 0 then
  local untilt = now + pause
  if untilt > tonumber(redis.call('GET', KEYS[2]) or '0') then
    redis.call('SET', KEYS[2], tostring(untilt), 'PX', math.ceil(pause * 1000) + 1000)
  end
end
return tostring(refused_for)
"""


class RateLimiter:
    def __init__(self, client: redis.Redis, max_rps: float) -> None:
        self.interval = 1.0 / max_rps
        self._args = [repr(self.interval), repr(self.interval * TOLERANCE_SLOTS), repr(MAX_TURN_AHEAD_S)]
        self._acquire = client.register_script(_ACQUIRE)
        self._block = client.register_script(_BLOCK)
        self._key_refused = client.register_script(_KEY_REFUSED)
        self._redis = client
        # Whether this process has seen the key refused since it last saw it accepted.
        self._refusal_seen = False

    def acquire(self) -> float:
        """Take a request slot now (return 0.0) or say how many seconds to wait for a turn."""
        wait = self._acquire(keys=[RATE_KEY, BLOCKED_KEY, TURNS_KEY], args=self._args)
        return max(0.0, float(wait))

    def block(self, seconds: float) -> None:
        """Hold every worker's requests back for ``seconds`` (a Retry-After)."""
        if seconds > 0:
            self._block(keys=[BLOCKED_KEY], args=[repr(seconds)])

    def key_refused(self, grace_s: float, pause_s: float) -> float:
        """Record that Check365 refused the API key; the seconds it has been refused for.

        A streak of refusals starts at the first and lasts while they come less than
        three pauses apart. Until ``grace_s`` have passed, every worker's requests are
        held back for ``pause_s``: one request per pause finds out whether the key works
        again, instead of one per watch.
        """
        self._refusal_seen = True
        refused_for = self._key_refused(keys=[KEY_REFUSED_KEY, BLOCKED_KEY], args=[repr(grace_s), repr(pause_s)])
        return max(0.0, float(refused_for))

    def key_accepted(self) -> None:
        """Check365 accepted the key: a streak of refusals seen by this process is over."""
        if self._refusal_seen:
            self._redis.delete(KEY_REFUSED_KEY)
            self._refusal_seen = False
