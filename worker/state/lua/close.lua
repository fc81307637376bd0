-- End the item's life as a final state, if the caller still holds it.
-- KEYS and ARGV[1] (JSON): see protocol.close_item in lib/protocol.lua.
-- Returns 1 when closed, 0 when the claim was lost.
--@include protocol
return protocol.close_item(KEYS, cjson.decode(ARGV[1]))
