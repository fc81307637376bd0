-- The gate before a delivery attempt: may the step holding this event attempt it now?
-- The endpoint's breaker and its cap on attempts in flight decide. Admitted, the attempt
-- takes a slot until the step's lease ends and is recorded as started on the event, so
-- that an attempt that never returns is found and counted by the next step. Refused,
-- the event is parked: back in the due set, due at its deadline, unarmed (no message,
-- no slot), and in the endpoint's waiting line, from which a freed slot, a closing
-- breaker or a probe's turn releases it (endpoint_settle.lua).
-- KEYS: event hash, due:events, endpoint hash, in-flight zset, waiting zset, backlog zset,
--       endpoints index zset, waiting endpoints set, attempts list
-- ARGV[1]: {holder, now, lease_s, cap, deadline, id, endpoint, started (the record, as
--          JSON text), now_iso, created_at}
-- Returns {verdict, state, failures, opened_at, probe_at, last_error, in flight}; the
-- verdict is go, probe, held_open, held_cap, expired (held past its deadline) or lost.
--@include protocol
--@include outbox
local ev, due, ep, inflight, waiting = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local a = cjson.decode(ARGV[1])
local holder, now, id, endpoint = a.holder, tonumber(a.now), a.id, a.endpoint
if not protocol.held(ev, holder) then return {'lost'} end
redis.call('ZADD', KEYS[6], 'NX', a.created_at, id)
redis.call('ZADD', KEYS[7], now, endpoint)
-- Slots are held until the step's lease ends on Redis's clock, as claims are (a host whose
-- clock runs ahead must not free a running step's slot); those of killed steps free themselves.
local clock = protocol.clock()
redis.call('ZREMRANGEBYSCORE', inflight, '-inf', '(' .. string.format('%.3f', clock))
-- A slot reserved for this event when it was released from the line is now its own.
redis.call('ZREM', inflight, 'r:' .. id)
redis.call('ZREM', waiting, id)
local b = redis.call('HMGET', ep, 'state', 'failures', 'opened_at', 'probe_at', 'last_error', 'probe')
local state = b[1] or 'closed'
local verdict
if state == 'closed' then
  if redis.call('ZCARD', inflight) < tonumber(a.cap) then verdict = 'go' else verdict = 'held_cap' end
else
  -- Open or half-open: one probe at a time, once the cool-down has passed.
  local probing = b[6] and b[6] ~= '' and redis.call('ZSCORE', inflight, b[6])
  if not probing and now >= tonumber(b[4] or '0') then
    verdict = 'probe'
    state = 'half_open'
    redis.call('HSET', ep, 'state', 'half_open', 'probe', holder, 'probe_reserved_until', '0')
  else
    verdict = 'held_open'
  end
end
local inflight_n = redis.call('ZCARD', inflight)
local function answer(v)
  return {v, state, b[2] or '0', b[3] or '', b[4] or '', b[5] or '', inflight_n}
end
if verdict == 'go' or verdict == 'probe' then
  redis.call('ZADD', inflight, string.format('%.3f', clock + tonumber(a.lease_s)), holder)
  outbox.begin_attempt(ev, a.started)
  redis.call('HDEL', ev, 'waiting_place')
  return answer(verdict)
end
if now >= tonumber(a.deadline) then return answer('expired') end
-- No longer held by this step, and no message: the sweep wakes it at its deadline.
protocol.schedule(ev, due, id, a.deadline, '0')
-- First come, first served: places are numbered. An event keeps its place if it had one
-- (it was released from the line and lost the race for the slot).
local place = redis.call('HGET', ev, 'waiting_place')
if not place then
  place = redis.call('HINCRBY', ep, 'places', 1)
  redis.call('HSET', ev, 'waiting_place', place)
end
redis.call('ZADD', waiting, place, id)
redis.call('SADD', KEYS[8], endpoint)
-- The breaker's history in the event's attempts: one line per open period it waited out.
if verdict == 'held_open' and redis.call('HGET', ev, 'held_for') ~= (b[3] or '') then
  redis.call('HSET', ev, 'held_for', b[3] or '')
  redis.call('RPUSH', KEYS[9], cjson.encode({
    at = a.now_iso, ok = false, held = 'breaker_open', breaker = state,
    breaker_opened_at = tonumber(b[3] or '0'), consecutive_failures = tonumber(b[2] or '0'),
    next_probe_at = tonumber(b[4] or '0'), error = 'not attempted: breaker open (last: ' .. (b[5] or '?') .. ')'
  }))
end
return answer(verdict)
