-- Take a request slot towards Check365 for the whole pool, or say how long to wait for a turn
-- (see worker/polling/ratelimit.py for the GCRA and the turns).
-- KEYS: rate key, blocked key, turns key; ARGV: interval (s), tolerance (s), max turn ahead (s)
-- Returns the seconds to wait as a string ('0' = go ahead, the slot is taken).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local ahead = tonumber(ARGV[3])
local blocked = tonumber(redis.call('GET', KEYS[2]) or '0')
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local turns = tonumber(redis.call('GET', KEYS[3]) or '0')
if blocked <= now and tat - tonumber(ARGV[2]) <= now then
  -- Whole slots since the last request (or the end of a Retry-After) that nobody took.
  local idle = math.floor((now - math.max(tat, blocked)) / interval)
  if tat < now then tat = now end
  -- Kept well past the furthest turn, so that an expired key never hides idle slots.
  redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', math.ceil((interval + 2 * ahead) * 1000))
  if idle > 0 and turns > now then
    local left = math.max(turns - idle * interval, now)
    redis.call('SET', KEYS[3], tostring(left), 'PX', math.ceil((left - now) * 1000) + 1000)
  end
  return '0'
end
-- Refused: the next turn after everyone already waiting, after any Retry-After.
local turn = math.max(tat, blocked, turns)
if turn - now > ahead then return tostring(ahead) end
redis.call('SET', KEYS[3], tostring(turn + interval), 'PX', math.ceil((turn + interval - now) * 1000) + 1000)
return tostring(turn - now)
