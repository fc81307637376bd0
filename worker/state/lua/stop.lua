-- End an active item's life whoever holds it (an operator's decision): any message
-- still on its way then finds it inactive. Lock keys that still point at it are freed.
-- KEYS: item hash, due zset, then lock keys to delete if they hold the member
-- ARGV[1]: JSON {member, state, ttl (seconds), fields {k: v}}
-- Returns 1 when stopped, 0 when it was not active.
--@include protocol
local a = cjson.decode(ARGV[1])
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
protocol.close(KEYS[1], KEYS[2], a.member, a.state)
for k, v in pairs(a.fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(a.ttl)))
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) == a.member then redis.call('DEL', KEYS[i]) end
end
return 1
