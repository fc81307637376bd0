-- The durable-item protocol's writes (worker/state/store.py, whose Lua half this is): the
-- only code that writes an item's state, token, due, armed and lease_until fields by name.
-- Every script that moves an item includes it (see scripts.py) and calls these functions;
-- the endpoint gate's scripts park and release events through them too.
local protocol = {}

-- Redis's own clock, in seconds: leases end on it, whatever the callers' clocks say.
function protocol.clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Does the caller hold the item (it is active and carries the caller's token)?
function protocol.held(key, token)
  return redis.call('HGET', key, 'state') == 'active' and redis.call('HGET', key, 'token') == token
end

-- A step holds the item for lease_s seconds of Redis's clock (what rearm compares).
function protocol.hold(key, lease_s)
  redis.call('HSET', key, 'lease_until', string.format('%.3f', protocol.clock() + tonumber(lease_s)))
end

-- Taken by the step whose token is holder: its lease ends at due on the step's clock (the
-- due zset's order) and lease_s from now on Redis's.
function protocol.lease(key, due_key, member, holder, due, lease_s)
  redis.call('HSET', key, 'token', holder, 'due', due, 'armed', '0')
  protocol.hold(key, lease_s)
  redis.call('ZADD', due_key, due, member)
end

-- The next step is due at due; armed ('1') when a message is on its way, '0' when the
-- sweep is to send one once due. No step holds it meanwhile.
function protocol.schedule(key, due_key, member, due, armed)
  redis.call('HSET', key, 'due', due, 'armed', armed)
  redis.call('HDEL', key, 'lease_until')
  redis.call('ZADD', due_key, due, member)
end

-- A fresh token for the message the caller sends, due at due.
function protocol.arm(key, due_key, member, token, due)
  redis.call('HSET', key, 'token', token)
  protocol.schedule(key, due_key, member, due, '1')
end

-- Active again (from a final state), armed with token.
function protocol.reopen(key, due_key, member, token, due)
  redis.call('HSET', key, 'state', 'active')
  protocol.arm(key, due_key, member, token, due)
end

-- The item's life ends as state: no token opens it again.
function protocol.close(key, due_key, member, state)
  redis.call('HSET', key, 'state', state, 'token', '')
  redis.call('ZREM', due_key, member)
end

-- The whole of schedule.lua: record when the item's next step is due, if the caller still
-- holds it. k: item hash, due zset, log list (the hash itself when there is no log);
-- a: {holder, member, due, armed ('1'/'0'), log ('' = none), fields {k: v}}. 1, or 0 when
-- the claim was lost. The log entry is appended whether or not the claim still holds: it
-- records something that already happened (an attempt was sent), whoever holds the item now.
function protocol.schedule_item(k, a)
  if a.log ~= '' then redis.call('RPUSH', k[3], a.log) end
  if not protocol.held(k[1], a.holder) then return 0 end
  protocol.schedule(k[1], k[2], a.member, a.due, a.armed)
  for f, v in pairs(a.fields) do redis.call('HSET', k[1], f, v) end
  return 1
end

-- The whole of close.lua: end the item's life as a final state, if the caller still holds
-- it. k: item hash, due zset, target zset (the due zset when there is none), log list (the
-- hash itself when there is no log), then keys that share the item's ttl; a: {holder,
-- member, state, ttl (seconds, '0' = keep), score ('' = no target), log ('' = none),
-- fields {k: v}}. 1, or 0 when the claim was lost; the log entry as in schedule_item.
function protocol.close_item(k, a)
  if a.log ~= '' then redis.call('RPUSH', k[4], a.log) end
  if not protocol.held(k[1], a.holder) then return 0 end
  protocol.close(k[1], k[2], a.member, a.state)
  for f, v in pairs(a.fields) do redis.call('HSET', k[1], f, v) end
  if a.score ~= '' then redis.call('ZADD', k[3], a.score, a.member) end
  local ttl = tonumber(a.ttl)
  if ttl > 0 then
    for i = 1, #k do
      if i == 1 or i >= 4 then redis.call('EXPIRE', k[i], math.ceil(ttl)) end
    end
  end
  return 1
end
