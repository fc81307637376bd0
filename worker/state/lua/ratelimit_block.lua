-- Hold back every worker's requests to Check365 for a Retry-After (Redis's clock).
-- KEYS: blocked key; ARGV: seconds. Only ever extends the block.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local untilt = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if untilt > current then
  redis.call('SET', KEYS[1], tostring(untilt), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return tostring(untilt - now)
