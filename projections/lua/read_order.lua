-- An order's view in one round trip: its row hash and its items.
-- ARGV: namespace, order id. Returns nil for an unknown or deleted order.
local key = ARGV[1] .. ':order:' .. ARGV[2]
local h = redis.call('HGETALL', key)
if #h == 0 then return false end
return { h, redis.call('HGETALL', key .. ':items') }
