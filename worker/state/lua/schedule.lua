-- Record when the item's next step is due, if the caller still holds it.
-- KEYS and ARGV[1] (JSON): see protocol.schedule_item in lib/protocol.lua.
-- Returns 1 when scheduled, 0 when the claim was lost.
--@include protocol
return protocol.schedule_item(KEYS, cjson.decode(ARGV[1]))
