-- A refused API key: hold back every worker's requests while the refusals are recent (Redis's clock).
-- KEYS: refused-since key, blocked key; ARGV: grace (s), pause (s)
-- Returns the seconds since the API key was first refused in this streak of refusals.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local grace, pause = tonumber(ARGV[1]), tonumber(ARGV[2])
local since = tonumber(redis.call('GET', KEYS[1]) or 'x') or now
redis.call('SET', KEYS[1], tostring(since), 'PX', math.ceil((3 * pause + 1) * 1000))
local refused_for = now - since
if refused_for < grace and pause > 0 then
  local untilt = now + pause
  if untilt > tonumber(redis.call('GET', KEYS[2]) or '0') then
    redis.call('SET', KEYS[2], tostring(untilt), 'PX', math.ceil(pause * 1000) + 1000)
  end
end
return tostring(refused_for)
