-- The earliest created_at of the pending events read (a string), or false.
-- KEYS: due:events; ARGV: event hash prefix, how many to read.
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local oldest = false
for _, id in ipairs(ids) do
  local c = tonumber(redis.call('HGET', ARGV[1] .. id, 'created_at') or '')
  if c and (not oldest or c < oldest) then oldest = c end
end
if oldest then return tostring(oldest) end
return false
