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
