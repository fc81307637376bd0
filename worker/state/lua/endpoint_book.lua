-- An attempt's booking on its event and its endpoint's settlement, in one call: the next
-- attempt scheduled (protocol.schedule_item) or the event ended, delivered or dead
-- (protocol.close_item), then the attempt's slot freed, the breaker fed and the waiting
-- events released (endpoint.settle). One round trip, and no moment at which the attempt
-- is booked but still holds its slot.
-- KEYS: the booking's (item_keys of them), then the settlement's
-- ARGV[1]: JSON {op ('schedule' or 'close'), item_keys, item {the booking's argument},
--          settle {the settlement's argument}}
-- Returns {booked (1, or 0 when the claim was lost), the settlement's answer}.
--@include protocol
--@include outbox
--@include endpoint
local a = cjson.decode(ARGV[1])
local n = tonumber(a.item_keys)
local item, settle = {}, {}
for i = 1, #KEYS do
  if i <= n then table.insert(item, KEYS[i]) else table.insert(settle, KEYS[i]) end
end
local booked
if a.op == 'close' then booked = protocol.close_item(item, a.item) else booked = protocol.schedule_item(item, a.item) end
return {booked, endpoint.settle(settle, a.settle)}
