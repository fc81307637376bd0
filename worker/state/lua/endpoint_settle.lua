-- After an attempt (or, from the sweep, with no attempt): free its slot, feed the breaker,
-- and hand the free slots (or the probe's turn) to the events waiting in line.
-- KEYS and ARGV[1] (JSON): see endpoint.settle in lib/endpoint.lua.
--@include protocol
--@include outbox
--@include endpoint
return endpoint.settle(KEYS, cjson.decode(ARGV[1]))
