-- Take the step for the message carrying the item's current token, swapping in
-- the holder's, and read what the step needs in the same call.
-- The lease's end is kept twice: as 'due' on the step's clock (the due zset's order),
-- and as 'lease_until' on Redis's own clock, which rearm.lua compares, so that a host
-- whose clock runs ahead cannot hand a running step's item to another.
-- KEYS: item hash, due zset, then optionally a string key and a list key to read
-- ARGV: token, holder, lease end (the step's clock), member, lease seconds
-- Returns false when the claim fails, else {hash fields, string value, list items}.
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return false end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return false end
local t = redis.call('TIME')
local lease_until = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'token', ARGV[2], 'due', ARGV[3], 'armed', '0', 'lease_until', string.format('%.3f', lease_until))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
local out = {redis.call('HGETALL', KEYS[1]), false, {}}
if #KEYS >= 3 then out[2] = redis.call('GET', KEYS[3]) end
if #KEYS >= 4 then out[3] = redis.call('LRANGE', KEYS[4], 0, -1) end
return out
