-- Bring an item back from a final state to active, due now, with a fresh token
-- (a dead letter replayed by an operator). It no longer expires.
-- KEYS: item hash, due zset, the zset it leaves (the dead letters)
-- ARGV[1]: JSON {was (the state it must be in), member, token, due, count (a field
--          counting reopenings), fields {k: v}}
-- Returns 1 when reopened, 0 when the item was not in that state.
--@include protocol
local a = cjson.decode(ARGV[1])
if redis.call('HGET', KEYS[1], 'state') ~= a.was then return 0 end
protocol.reopen(KEYS[1], KEYS[2], a.member, a.token, a.due)
for k, v in pairs(a.fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HINCRBY', KEYS[1], a.count, 1)
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[3], a.member)
return 1
