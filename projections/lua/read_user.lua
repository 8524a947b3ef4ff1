-- A customer's view in one round trip: its hash (profile columns, counts,
-- spend, last activity) and its last orders with their status and totals.
-- ARGV: namespace, customer id. Returns nil for an unknown customer.
local ns, id = ARGV[1], ARGV[2]
local ukey = ns .. ':user:' .. id
local h = redis.call('HGETALL', ukey)
if #h == 0 then return false end
local ids = redis.call('ZREVRANGE', ukey .. ':recent', 0, 19)
local rows = {}
for i, m in ipairs(ids) do
  local oid = string.gsub(m, '^0+(%d)', '%1')  -- members of numeric ids are zero-padded
  ids[i] = oid
  rows[i] = redis.call('HMGET', ns .. ':order:' .. oid, '@s', '@row')
end
return { h, ids, rows, redis.call('ZSCORE', ns .. ':last', id) }
