-- Create a watch unless one is active for its (job_id, callback_url) pair, or a
-- watch of this id exists already. A watch id is derived from the start message's
-- id: a message the broker delivers again (its worker died before acknowledging it)
-- finds its watch, even a finished one.
-- KEYS: active key, watch hash, due:watches, job index
-- ARGV[1]: JSON {watch_id, due, ttl (of the job index, seconds), watch_prefix (of
--          watch hash keys), fields {k: v} (the whole new hash), lease_s (seconds the
--          caller holds it, '' = none)}
-- Returns '' when created, else the id of the watch that exists (this one or the active one).
--@include protocol
local a = cjson.decode(ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then return a.watch_id end
local existing = redis.call('GET', KEYS[1])
if existing then
  if redis.call('HGET', a.watch_prefix .. existing, 'state') == 'active' then return existing end
end
redis.call('SET', KEYS[1], a.watch_id)
for k, v in pairs(a.fields) do redis.call('HSET', KEYS[2], k, v) end
if a.lease_s ~= '' then
  -- Created claimed by the caller: its lease on Redis's clock (see claim.lua).
  protocol.hold(KEYS[2], a.lease_s)
end
redis.call('ZADD', KEYS[3], a.due, a.watch_id)
redis.call('SADD', KEYS[4], a.watch_id)
redis.call('EXPIRE', KEYS[4], a.ttl)
return ''
