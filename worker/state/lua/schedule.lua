-- Record when the item's next step is due, if the caller still holds it.
-- The log entry is appended whether or not the claim still holds: it records
-- something that already happened (an attempt was sent), whoever holds the item now.
-- KEYS: item hash, due zset, log list (the hash itself when there is no log)
-- ARGV[1]: JSON {holder, member, due, armed ('1'/'0'), log ('' = none), fields {k: v}}
-- Returns 1 when scheduled, 0 when the claim was lost.
local a = cjson.decode(ARGV[1])
if a.log ~= '' then redis.call('RPUSH', KEYS[3], a.log) end
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
if redis.call('HGET', KEYS[1], 'token') ~= a.holder then return 0 end
redis.call('HSET', KEYS[1], 'due', a.due, 'armed', a.armed)
redis.call('HDEL', KEYS[1], 'lease_until')
for k, v in pairs(a.fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZADD', KEYS[2], a.due, a.member)
return 1
