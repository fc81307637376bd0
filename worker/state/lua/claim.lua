-- Take the step for the message carrying the item's current token, swapping in
-- the holder's, and read what the step needs in the same call.
-- The lease's end is kept twice: as 'due' on the step's clock (the due zset's order),
-- and as 'lease_until' on Redis's own clock, which rearm.lua compares, so that a host
-- whose clock runs ahead cannot hand a running step's item to another.
-- KEYS: item hash, due zset, then optionally a string key and a list key to read
-- ARGV: token, holder, lease end (the step's clock), member, lease seconds
-- Returns false when the claim fails, else {hash fields, string value, list items}.
--@include protocol
if not protocol.held(KEYS[1], ARGV[1]) then return false end
protocol.lease(KEYS[1], KEYS[2], ARGV[4], ARGV[2], ARGV[3], ARGV[5])
local out = {redis.call('HGETALL', KEYS[1]), false, {}}
if #KEYS >= 3 then out[2] = redis.call('GET', KEYS[3]) end
if #KEYS >= 4 then out[3] = redis.call('LRANGE', KEYS[4], 0, -1) end
return out
