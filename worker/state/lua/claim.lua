-- Take the step for the message carrying the item's current token, swapping in
-- the holder's, and read what the step needs in the same call.
-- KEYS: item hash, due zset, then optionally a string key and a list key to read
-- ARGV: token, holder, lease end, member
-- Returns false when the claim fails, else {hash fields, string value, list items}.
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return false end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'token', ARGV[2], 'due', ARGV[3], 'armed', '0')
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
local out = {redis.call('HGETALL', KEYS[1]), false, {}}
if #KEYS >= 3 then out[2] = redis.call('GET', KEYS[3]) end
if #KEYS >= 4 then out[3] = redis.call('LRANGE', KEYS[4], 0, -1) end
return out
