-- The outbox's Lua half (worker/state/outbox.py): the event fields that scripts of other
-- modules set, set here alone.
local outbox = {}

-- An attempt begins (the endpoint's gate let it through): recorded on the event, so that
-- the step after it counts it as failed if it never returns. Booking the attempt clears it.
function outbox.begin_attempt(key, record)
  redis.call('HSET', key, 'started', record)
end
