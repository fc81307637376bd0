-- Finishing a watch and creating its events is one atomic step, so an outcome can
-- never exist without the events that announce it. A small body travels in the
-- script's arguments; bigger ones were staged by the step (see worker/state/outbox.py)
-- and are renamed into place here, so that a big job's bodies never pass through one
-- call. Every staged body is checked before anything is written, since a script that
-- stopped half-way would keep its writes.
-- KEYS: watch hash, due:watches, active key, due:events
-- ARGV[1]: JSON {holder, watch_id, ttl (of the finished watch, seconds),
--          watch {k: v} (the watch's closing fields),
--          event_prefix, body_prefix, staged_prefix (of event, body and staged body keys),
--          due (of the new events), leased (true: they are created claimed by the caller),
--          lease_s (how long, on Redis's clock: see claim.lua),
--          events [{id, fields {k: v} (the whole new hash)}],
--          gate (optional: endpoint.admit's argument for the single leased event's first attempt)}
-- KEYS[5...]: with a gate, endpoint.admit's keys
-- ARGV[1 + i]: the i-th event's body, '' when the step staged it
-- Returns 2 when finished with every event leased to the caller, 1 when finished,
-- 0 when the claim was lost, -1 when a staged body is missing; with a gate,
-- {that number, the gate's answer (only when 2)}.
--@include protocol
--@include outbox
--@include endpoint
local a = cjson.decode(ARGV[1])
local function answer(result, gated)
  if a.gate then return {result, gated} end
  return result
end
if not protocol.held(KEYS[1], a.holder) then return answer(0) end
for i, e in ipairs(a.events) do
  if ARGV[i + 1] == '' and redis.call('EXISTS', a.event_prefix .. e.id) == 0
     and redis.call('EXISTS', a.staged_prefix .. e.id) == 0 then
    return answer(-1)
  end
end
local result = 1
if a.leased then result = 2 end
for i, e in ipairs(a.events) do
  local ekey = a.event_prefix .. e.id
  local staged = a.staged_prefix .. e.id
  local inline = ARGV[i + 1]
  if redis.call('EXISTS', ekey) == 0 then
    for k, v in pairs(e.fields) do redis.call('HSET', ekey, k, v) end
    if a.leased then protocol.hold(ekey, a.lease_s) end
    local body = a.body_prefix .. e.id
    if inline == '' then
      redis.call('RENAME', staged, body)
      redis.call('PERSIST', body)
    else
      redis.call('SET', body, inline)
    end
    redis.call('ZADD', KEYS[4], a.due, e.id)
  else
    -- Not this step's to claim: it already exists, waiting for its own message.
    result = 1
    if inline == '' then redis.call('DEL', staged) end
  end
end
for k, v in pairs(a.watch) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZREM', KEYS[2], a.watch_id)
if redis.call('GET', KEYS[3]) == a.watch_id then redis.call('DEL', KEYS[3]) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(a.ttl)))
if a.gate and result == 2 then
  -- The step delivers the event next: its first attempt passes the gate now, one round trip
  -- fewer. Recorded as started a moment before it is sent, as by a gate run alone.
  local k = {}
  for i = 5, #KEYS do table.insert(k, KEYS[i]) end
  return answer(result, endpoint.admit(k, a.gate))
end
return answer(result)
