-- Record when the item's next step is due, if the caller still holds it.
-- The log entry is appended whether or not the claim still holds: it records
-- something that already happened (an attempt was sent), whoever holds the item now.
-- KEYS: item hash, due zset, log list (the hash itself when there is no log)
-- ARGV[1]: JSON {holder, member, due, armed ('1'/'0'), log ('' = none), fields {k: v}}
-- Returns 1 when scheduled, 0 when the claim was lost.
--@include protocol
local a = cjson.decode(ARGV[1])
if a.log ~= '' then redis.call('RPUSH', KEYS[3], a.log) end
if not protocol.held(KEYS[1], a.holder) then return 0 end
protocol.schedule(KEYS[1], KEYS[2], a.member, a.due, a.armed)
for k, v in pairs(a.fields) do redis.call('HSET', KEYS[1], k, v) end
return 1
