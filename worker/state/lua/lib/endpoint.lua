-- The endpoint gate's Lua half (worker/state/endpoints.py): the gate itself, which
-- endpoint_admit.lua runs alone and finish_watch.lua after creating an event its step
-- delivers, and the settlement, which endpoint_settle.lua runs alone (the sweep) and
-- endpoint_book.lua after booking an attempt. Needs lib/protocol.lua and lib/outbox.lua.
local endpoint = {}

-- After an attempt (or, from the sweep, with no attempt): free its slot, feed the breaker,
-- and hand the free slots (or the probe's turn) to the events waiting in line.
-- A success closes the breaker; a failure counts towards opening it, and a failed probe
-- opens it again for twice the previous cool-down (up to the maximum).
-- Released events get a fresh token, are due now and armed: the caller sends their
-- messages (if it dies first, the sweep re-arms them). A slot is reserved for each until
-- it reaches the gate, so that newcomers do not take it.
-- k: endpoint hash, in-flight zset, waiting zset, backlog zset, waiting endpoints set,
--       due:events
-- a: {holder ('' = none), now, outcome (ok, fail, none), threshold, cooldown (the first),
--          cooldown_max, cap, id (the event, '' = none), closed ('1' when the event has ended),
--          event_prefix (of event keys), reserve_s (a released event's slot), token_prefix,
--          endpoint, error}
-- Returns {transition ('', opened, reopened, closed), state, failures, cool-down,
--          opened_at, released: {id, token, queue, ...}}
function endpoint.settle(k, a)
  local ep, inflight, waiting = k[1], k[2], k[3]
  local holder, now, outcome, id = a.holder, tonumber(a.now), a.outcome, a.id
  if holder ~= '' then redis.call('ZREM', inflight, holder) end
  if id ~= '' and a.closed == '1' then
    redis.call('ZREM', k[4], id)
    redis.call('ZREM', waiting, id)
  end
  -- Slots and reservations end on Redis's clock (see endpoint.admit, below).
  local clock = protocol.clock()
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', '(' .. string.format('%.3f', clock))
  local b = redis.call('HMGET', ep, 'state', 'failures', 'probe', 'opens', 'opened_at', 'probe_at', 'cooldown',
                       'probe_reserved_until')
  local state = b[1] or 'closed'
  local failures = tonumber(b[2] or '0')
  local opens = tonumber(b[4] or '0')
  local cooldown = tonumber(b[7] or '0')
  local opened_at = b[5] or ''
  local probe_at = tonumber(b[6] or '0')
  local transition = ''
  if outcome == 'ok' then
    failures = 0
    redis.call('HSET', ep, 'failures', '0')
    if state ~= 'closed' then
      transition = 'closed'
      state = 'closed'
      redis.call('HSET', ep, 'state', 'closed', 'probe', '', 'opens', '0', 'closed_at', a.now)
    end
  elseif outcome == 'fail' then
    failures = failures + 1
    redis.call('HSET', ep, 'failures', failures, 'last_error', a.error, 'last_failure_at', a.now)
    local reopen = state == 'half_open' and holder ~= '' and b[3] == holder
    if reopen or (state == 'closed' and failures >= tonumber(a.threshold)) then
      if reopen then
        transition = 'reopened'
        opens = opens + 1
      else
        transition = 'opened'
        opens = 1
        opened_at = a.now
      end
      cooldown = math.min(tonumber(a.cooldown) * 2 ^ (opens - 1), tonumber(a.cooldown_max))
      probe_at = now + cooldown
      state = 'open'
      redis.call('HSET', ep, 'state', 'open', 'probe', '', 'opens', opens, 'opened_at', opened_at,
                 'probe_at', tostring(probe_at), 'cooldown', tostring(cooldown))
    end
  end
  -- Free slots go to the oldest waiting events; an open breaker lets one through as its probe.
  local n = 0
  if state == 'closed' then
    n = tonumber(a.cap) - redis.call('ZCARD', inflight)
  elseif now >= probe_at and now >= tonumber(b[8] or '0') then
    local probing = b[3] and b[3] ~= '' and redis.call('ZSCORE', inflight, b[3])
    if not probing then n = 1 end
  end
  local released = {}
  local i = 0
  while n > 0 do
    local head = redis.call('ZPOPMIN', waiting)
    if #head == 0 then break end
    local wid = head[1]
    local key = a.event_prefix .. wid
    if redis.call('HGET', key, 'state') == 'active' then
      i = i + 1
      local token = a.token_prefix .. i
      protocol.arm(key, k[6], wid, token, a.now)
      if state == 'closed' then
        redis.call('ZADD', inflight, string.format('%.3f', clock + tonumber(a.reserve_s)), 'r:' .. wid)
      else
        redis.call('HSET', ep, 'probe_reserved_until', tostring(now + tonumber(a.reserve_s)))
      end
      table.insert(released, wid)
      table.insert(released, token)
      table.insert(released, redis.call('HGET', key, 'queue') or '')
      n = n - 1
    end
  end
  if redis.call('ZCARD', waiting) == 0 then redis.call('SREM', k[5], a.endpoint) end
  return {transition, state, tostring(failures), tostring(cooldown), opened_at, released}
end

-- The gate before a delivery attempt: may the step holding this event attempt it now?
-- The endpoint's breaker and its cap on attempts in flight decide. Admitted, the attempt
-- takes a slot until the step's lease ends and is recorded as started on the event, so
-- that an attempt that never returns is found and counted by the next step. Refused,
-- the event is parked: back in the due set, due at its deadline, unarmed (no message,
-- no slot), and in the endpoint's waiting line, from which a freed slot, a closing
-- breaker or a probe's turn releases it (endpoint.settle, above).
-- k: event hash, due:events, endpoint hash, in-flight zset, waiting zset, backlog zset,
--    endpoints index zset, waiting endpoints set, attempts list
-- a: {holder, now, lease_s, cap, deadline, id, endpoint, record (the attempt's
--    started record, as JSON text), now_iso, created_at}
-- Returns {verdict, state, failures, opened_at, probe_at, last_error, in flight}; the
-- verdict is go, probe, held_open, held_cap, expired (held past its deadline) or lost.
function endpoint.admit(k, a)
  local ev, due, ep, inflight, waiting = k[1], k[2], k[3], k[4], k[5]
  local holder, now, id = a.holder, tonumber(a.now), a.id
  if not protocol.held(ev, holder) then return {'lost'} end
  redis.call('ZADD', k[6], 'NX', a.created_at, id)
  redis.call('ZADD', k[7], now, a.endpoint)
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
    outbox.begin_attempt(ev, a.record)
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
  redis.call('SADD', k[8], a.endpoint)
  -- The breaker's history in the event's attempts: one line per open period it waited out.
  if verdict == 'held_open' and redis.call('HGET', ev, 'held_for') ~= (b[3] or '') then
    redis.call('HSET', ev, 'held_for', b[3] or '')
    redis.call('RPUSH', k[9], cjson.encode({
      at = a.now_iso, ok = false, held = 'breaker_open', breaker = state,
      breaker_opened_at = tonumber(b[3] or '0'), consecutive_failures = tonumber(b[2] or '0'),
      next_probe_at = tonumber(b[4] or '0'), error = 'not attempted: breaker open (last: ' .. (b[5] or '?') .. ')'
    }))
  end
  return answer(verdict)
end
