-- End the item's life as a final state, if the caller still holds it.
-- The log entry is appended whether or not the claim still holds (see schedule.lua).
-- KEYS: item hash, due zset, target zset (the due zset when there is none),
--       log list (the hash itself when there is no log), then keys that share the item's ttl
-- ARGV[1]: JSON {holder, member, state, ttl (seconds, '0' = keep), score ('' = no target),
--          log ('' = none), fields {k: v}}
-- Returns 1 when closed, 0 when the claim was lost.
--@include protocol
local a = cjson.decode(ARGV[1])
if a.log ~= '' then redis.call('RPUSH', KEYS[4], a.log) end
if not protocol.held(KEYS[1], a.holder) then return 0 end
protocol.close(KEYS[1], KEYS[2], a.member, a.state)
for k, v in pairs(a.fields) do redis.call('HSET', KEYS[1], k, v) end
if a.score ~= '' then redis.call('ZADD', KEYS[3], a.score, a.member) end
local ttl = tonumber(a.ttl)
if ttl > 0 then
  for i = 1, #KEYS do
    if i == 1 or i >= 4 then redis.call('EXPIRE', KEYS[i], math.ceil(ttl)) end
  end
end
return 1
