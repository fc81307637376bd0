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

from typing import Any

import redis

from check365_client.names import PREFIX
from worker.state import scripts

RATE_KEY = f"{PREFIX}ratelimit:check365"
BLOCKED_KEY = f"{PREFIX}blocked_until"
TURNS_KEY = f"{PREFIX}ratelimit:turns"
# While Check365 refuses the API key, the pool pauses its requests (contract section 3):
# this key holds when the streak of refusals began (Redis's clock) and lives while it lasts.
# The pool gauges and ``doctor`` read it.
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


class RateLimiter:
    def __init__(self, client: redis.Redis, max_rps: float) -> None:
        self.interval = 1.0 / max_rps
        self._args = [repr(self.interval), repr(self.interval * TOLERANCE_SLOTS), repr(MAX_TURN_AHEAD_S)]
        self._acquire = scripts.load(client, "ratelimit_acquire")
        self._block = scripts.load(client, "ratelimit_block")
        self._key_refused = scripts.load(client, "ratelimit_key_refused")
        self._redis = client
        # Whether this process has seen the key refused since it last saw it accepted.
        self._refusal_seen = False

    def acquire(self) -> float:
        """Take a request slot now (return 0.0) or say how many seconds to wait for a turn."""
        return self.wait_of(self.acquire_call().run())

    def acquire_call(self) -> scripts.Call:
        """``acquire`` as a call to run with others (``scripts.run_together``); ``wait_of`` reads its answer."""
        return scripts.Call(self._acquire, [RATE_KEY, BLOCKED_KEY, TURNS_KEY], self._args)

    @staticmethod
    def wait_of(answer: Any) -> float:
        return max(0.0, float(answer))

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
