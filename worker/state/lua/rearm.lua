-- Give an item whose message is overdue a fresh token (the caller sends the message).
-- An armed item's message gets a grace period past its due time before it counts as lost.
-- KEYS: item hash, due zset
-- ARGV: now, grace seconds, new token, member
-- Returns 1 when re-armed, 0 when not due (or no longer active: then it leaves the due zset).
--@include protocol
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'active' then redis.call('ZREM', KEYS[2], ARGV[4]); return 0 end
-- A step holds it until its lease ends on Redis's clock, whatever the caller's clock says.
local lease_until = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '')
if lease_until ~= nil and lease_until > protocol.clock() then return 0 end
local due = tonumber(redis.call('HGET', KEYS[1], 'due'))
local wait = 0
if redis.call('HGET', KEYS[1], 'armed') == '1' then wait = tonumber(ARGV[2]) end
if due ~= nil and due + wait > tonumber(ARGV[1]) then return 0 end
protocol.arm(KEYS[1], KEYS[2], ARGV[4], ARGV[3], ARGV[1])
return 1
