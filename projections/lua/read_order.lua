-- An order's view in one round trip: its hash holds the row and its items.
-- ARGV: namespace, order id. Returns nil for an unknown order.
local h = redis.call('HGETALL', ARGV[1] .. ':order:' .. ARGV[2])
if #h == 0 then return false end
return h
