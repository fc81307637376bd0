-- The gate before a delivery attempt, alone (lib/endpoint.lua, endpoint.admit, says what it does).
-- KEYS and ARGV[1] (as JSON): endpoint.admit's k and a.
--@include protocol
--@include outbox
--@include endpoint
return endpoint.admit(KEYS, cjson.decode(ARGV[1]))
