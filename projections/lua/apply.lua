-- One batch of the Redis user views, applied atomically: guarded row writes
-- plus the Kafka positions they reflect. docs/redis-views.md describes the keys.
--
-- ARGV[1] namespace, ARGV[2] number of positions P, then P triples
-- (field "topic:partition", offset, watermark; both 20-digit zero-padded),
-- then the ops, each an opcode followed by its fields (projections/redis_views.py
-- builds them):
--   C id rv act n col val ... m col ...    customers row upsert (m unavailable columns)
--   c id rv                                customers row delete
--   O id rv act cust n col val ... m col ...   orders row upsert
--   o id rv                                orders row delete
--   I order line rv json                   order_items row upsert
--   i order line rv                        order_items row delete
--   P order payment rv cents               payments row upsert (signed cents)
--   p order payment rv                     payments row delete
--   T table rv                             truncate of a table
-- rv (row version) is the event version zero-padded to 25 digits followed by the
-- change's seq padded to 10: fixed width, so plain string comparison orders them
-- (versions exceed 2^53; Lua numbers are doubles). act is the row's updated_at,
-- normalized to fixed width by Python, so it compares as a string too.
-- Returns {ops applied, ops skipped as replayed or older}.

local call = redis.call
local sbyte, ssub, smatch = string.byte, string.sub, string.match
local ns = ARGV[1]
local TRUNC = ns .. ':truncated'
local ZERO = string.rep('0', 35)
local AT = 64 -- '@'
local RECENT = 20

local trunc = {}
do
  local t = call('HGETALL', TRUNC)
  for i = 1, #t, 2 do trunc[t[i]] = t[i + 1] end
end

local function neg(s)
  if sbyte(s, 1) == 45 then return ssub(s, 2) end
  return '-' .. s
end

local function unquote(s)
  if sbyte(s, 1) == 34 then return ssub(s, 2, -2) end
  return s
end

-- HINCRBY that leaves no zero fields behind: equal views dump equal.
local function incr(key, field, by)
  if tonumber(call('HINCRBY', key, field, by)) == 0 then call('HDEL', key, field) end
end

local function parse_lag(s)
  local lag = {}
  if s then
    for c, v in string.gmatch(s, '([^;=]+)=([^;]+);') do lag[c] = v end
  end
  return lag
end

local function format_lag(lag)
  local parts = {}
  for c, v in pairs(lag) do parts[#parts + 1] = c .. '=' .. v .. ';' end
  if #parts == 0 then return nil end
  table.sort(parts)
  return table.concat(parts)
end

-- A row's own fields (columns and row metadata), as opposed to derived ones.
local function is_row_field(f)
  return sbyte(f, 1) ~= AT or f == '@v' or f == '@del' or f == '@lag' or f == '@ts'
end

local function drop_row_fields(key)
  local h = call('HGETALL', key)
  local d = { key }
  for i = 1, #h, 2 do
    if is_row_field(h[i]) then d[#d + 1] = h[i] end
  end
  if #d > 1 then call('HDEL', unpack(d)) end
end

-- Last-writer-wins by row version; a column absent from a newer write (an
-- unchanged TOAST value) keeps its value and remembers, in @lag, the version it
-- is from, so an older write may still fill it in (any delivery order converges).
local function upsert(key, rv, ci, n, ui, m)
  local st = call('HMGET', key, '@v', '@del', '@lag')
  local cur, del, lag_s = st[1], st[2], st[3]
  if cur and rv <= cur then
    if rv == cur or del or not lag_s then return false end
    local lag = parse_lag(lag_s)
    local args = { key }
    for k = ci, ci + 2 * n - 1, 2 do
      local c = ARGV[k]
      local lv = lag[c]
      if lv and rv > lv then
        args[#args + 1] = c
        args[#args + 1] = ARGV[k + 1]
        lag[c] = rv
      end
    end
    if #args == 1 then return false end
    args[#args + 1] = '@lag'
    args[#args + 1] = format_lag(lag)
    call('HSET', unpack(args))
    return true
  end
  local args = { key, '@v', rv }
  for k = ci, ci + 2 * n - 1 do args[#args + 1] = ARGV[k] end
  local new_lag = nil
  if m > 0 then
    local old = parse_lag(lag_s)
    local have = {}
    if cur and not del then
      local q = { key }
      for k = ui, ui + m - 1 do q[#q + 1] = ARGV[k] end
      have = call('HMGET', unpack(q))
    end
    local lag = {}
    for k = ui, ui + m - 1 do
      local c = ARGV[k]
      lag[c] = old[c] or (have[k - ui + 1] and cur) or ZERO
    end
    new_lag = format_lag(lag)
    args[#args + 1] = '@lag'
    args[#args + 1] = new_lag
  end
  call('HSET', unpack(args))
  if lag_s and not new_lag then call('HDEL', key, '@lag') end
  if del then call('HDEL', key, '@del') end
  return true
end

-- A delete leaves a tombstone (@v, @del) so that older writes cannot resurrect the row.
local function delete(key, rv)
  local cur = call('HGET', key, '@v')
  if cur and rv <= cur then return false end
  drop_row_fields(key)
  call('HSET', key, '@v', rv, '@del', '1')
  return true
end

local function split_link(s)
  return smatch(s, '^(.*)|([^|]*)|([^|]*)|([^|]*)$')
end

-- The customer's counts, spend and recent list are sums over its orders: each
-- order records in @link what it currently contributes ("customer|status|
-- currency|cents"); when its state changes, the difference is applied. So a
-- replay (no state change) never counts twice.
local function relink(oid)
  local okey = ns .. ':order:' .. oid
  local f = call('HMGET', okey, '@link', '@v', '@del', 'customer_id', 'status', 'currency', '@paid', '@ts')
  local old = f[1] or ''
  local new = ''
  if f[2] and not f[3] and f[4] and f[5] then
    new = unquote(f[4]) .. '|' .. unquote(f[5]) .. '|' .. unquote(f[6] or '""') .. '|' .. (f[7] or '0')
  end
  if new == old then return end
  local oc, ost, ocur, ocents, nc, nst, ncur, ncents
  if old ~= '' then
    oc, ost, ocur, ocents = split_link(old)
    local ukey = ns .. ':user:' .. oc
    incr(ukey, '@n:' .. ost, -1)
    if ocents ~= '0' then incr(ukey, '@spend:' .. ocur, neg(ocents)) end
  end
  if new ~= '' then
    nc, nst, ncur, ncents = split_link(new)
    local ukey = ns .. ':user:' .. nc
    incr(ukey, '@n:' .. nst, 1)
    if ncents ~= '0' then incr(ukey, '@spend:' .. ncur, ncents) end
    if nc ~= oc then
      local rkey = ukey .. ':recent'
      call('ZADD', rkey, f[8] or '0', oid)
      call('ZREMRANGEBYRANK', rkey, 0, -(RECENT + 1))
      call('SADD', ns .. ':users', nc)
    end
    call('HSET', okey, '@link', new)
  else
    call('HDEL', okey, '@link')
  end
  if old ~= '' and nc ~= oc then call('ZREM', ns .. ':user:' .. oc .. ':recent', oid) end
end

local function activity(cust, act)
  if act == '' or cust == '' then return end
  local ukey = ns .. ':user:' .. cust
  local last = call('HGET', ukey, '@last')
  if not last or act > last then call('HSET', ukey, '@last', act) end
end

local seen_users, seen_orders = {}, {}
local function index_user(id)
  if not seen_users[id] then
    seen_users[id] = true
    call('SADD', ns .. ':users', id)
  end
end
local function index_order(id)
  if not seen_orders[id] then
    seen_orders[id] = true
    call('SADD', ns .. ':orders', id)
  end
end

local function fresh(table_name, rv)
  local t = trunc[table_name]
  return not t or rv > t
end

-- Child rows (items, payments) are packed as "rv|value" in one hash per order;
-- an empty value (items) or "D" (payments) is a tombstone.
local function child_write(key, field, rv, value)
  local old = call('HGET', key, field)
  if old and rv <= ssub(old, 1, 35) then return false, nil end
  call('HSET', key, field, rv .. '|' .. value)
  return true, old
end

local function payment_write(oid, pid, rv, cents)
  local okey = ns .. ':order:' .. oid
  local ok, old = child_write(okey .. ':pay', pid, rv, cents)
  if not ok then return false end
  local was = (old and ssub(old, 37)) or 'D'
  if was ~= 'D' and was ~= '0' then incr(okey, '@paid', neg(was)) end
  if cents ~= 'D' and cents ~= '0' then incr(okey, '@paid', cents) end
  if was ~= cents then relink(oid) end
  return true
end

-- Truncate: rows older than the truncate go (no tombstone: the table's
-- truncate version in ns:truncated rejects older writes from now on); rows
-- already rewritten after it stay, minus columns only known from before it.
local function truncate_rows(set, prefix, rv, is_order)
  for _, id in ipairs(call('SMEMBERS', set)) do
    local key = ns .. ':' .. prefix .. ':' .. id
    local st = call('HMGET', key, '@v', '@lag')
    if st[1] and st[1] < rv then
      drop_row_fields(key)
      if is_order then relink(id) end
    elseif st[2] then
      local lag = parse_lag(st[2])
      local gone = { key }
      for c, v in pairs(lag) do
        if v < rv then
          gone[#gone + 1] = c
          lag[c] = ZERO
        end
      end
      if #gone > 1 then
        call('HDEL', unpack(gone))
        call('HSET', key, '@lag', format_lag(lag))
      end
    end
  end
end

local function truncate_children(suffix, rv, is_pay)
  for _, oid in ipairs(call('SMEMBERS', ns .. ':orders')) do
    local okey = ns .. ':order:' .. oid
    local key = okey .. suffix
    local h = call('HGETALL', key)
    local gone = { key }
    local changed = false
    for i = 1, #h, 2 do
      local packed = h[i + 1]
      if ssub(packed, 1, 35) < rv then
        gone[#gone + 1] = h[i]
        local cents = ssub(packed, 37)
        if is_pay and cents ~= 'D' and cents ~= '0' then
          incr(okey, '@paid', neg(cents))
          changed = true
        end
      end
    end
    if #gone > 1 then call('HDEL', unpack(gone)) end
    if changed then relink(oid) end
  end
end

local function truncate(table_name, rv)
  if not fresh(table_name, rv) then return false end
  trunc[table_name] = rv
  call('HSET', TRUNC, table_name, rv)
  if table_name == 'customers' then
    truncate_rows(ns .. ':users', 'user', rv, false)
  elseif table_name == 'orders' then
    truncate_rows(ns .. ':orders', 'order', rv, true)
  elseif table_name == 'order_items' then
    truncate_children(':items', rv, false)
  elseif table_name == 'payments' then
    truncate_children(':pay', rv, true)
  end
  return true
end

-- positions: the offset and the watermark of a partition never move backwards
local npos = tonumber(ARGV[2])
local i = 3
if npos > 0 then
  local pkey = ns .. ':positions'
  local q = { pkey }
  for k = 0, npos - 1 do q[#q + 1] = ARGV[i + 3 * k] end
  local old = call('HMGET', unpack(q))
  local args = { pkey }
  for k = 0, npos - 1 do
    local off, wm = ARGV[i + 3 * k + 1], ARGV[i + 3 * k + 2]
    local o = old[k + 1]
    if o then
      local ooff, owm = ssub(o, 1, 20), ssub(o, 22, 41)
      if ooff > off then off = ooff end
      if owm > wm then wm = owm end
    end
    args[#args + 1] = ARGV[i + 3 * k]
    args[#args + 1] = off .. ' ' .. wm
  end
  call('HSET', unpack(args))
  i = i + 3 * npos
end

local applied, skipped = 0, 0
local nargs = #ARGV
while i <= nargs do
  local op = ARGV[i]
  local ok = false
  if op == 'O' then
    local id, rv, act, cust = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    local n = tonumber(ARGV[i + 5])
    local m = tonumber(ARGV[i + 6 + 2 * n])
    index_order(id)
    if cust ~= '' then
      index_user(cust)
      activity(cust, act)
    end
    if fresh('orders', rv) then
      ok = upsert(ns .. ':order:' .. id, rv, i + 6, n, i + 7 + 2 * n, m)
      if ok then relink(id) end
    end
    i = i + 7 + 2 * n + m
  elseif op == 'I' then
    local oid = ARGV[i + 1]
    index_order(oid)
    if fresh('order_items', ARGV[i + 3]) then
      ok = child_write(ns .. ':order:' .. oid .. ':items', ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
    end
    i = i + 5
  elseif op == 'P' then
    local oid = ARGV[i + 1]
    index_order(oid)
    if fresh('payments', ARGV[i + 3]) then
      ok = payment_write(oid, ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
    end
    i = i + 5
  elseif op == 'C' then
    local id, rv, act = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local n = tonumber(ARGV[i + 4])
    local m = tonumber(ARGV[i + 5 + 2 * n])
    index_user(id)
    activity(id, act)
    if fresh('customers', rv) then
      ok = upsert(ns .. ':user:' .. id, rv, i + 5, n, i + 6 + 2 * n, m)
    end
    i = i + 6 + 2 * n + m
  elseif op == 'o' then
    local id, rv = ARGV[i + 1], ARGV[i + 2]
    index_order(id)
    if fresh('orders', rv) then
      ok = delete(ns .. ':order:' .. id, rv)
      if ok then relink(id) end
    end
    i = i + 3
  elseif op == 'c' then
    local id, rv = ARGV[i + 1], ARGV[i + 2]
    index_user(id)
    if fresh('customers', rv) then ok = delete(ns .. ':user:' .. id, rv) end
    i = i + 3
  elseif op == 'i' then
    local oid = ARGV[i + 1]
    index_order(oid)
    if fresh('order_items', ARGV[i + 3]) then
      ok = child_write(ns .. ':order:' .. oid .. ':items', ARGV[i + 2], ARGV[i + 3], '')
    end
    i = i + 4
  elseif op == 'p' then
    local oid = ARGV[i + 1]
    index_order(oid)
    if fresh('payments', ARGV[i + 3]) then
      ok = payment_write(oid, ARGV[i + 2], ARGV[i + 3], 'D')
    end
    i = i + 4
  elseif op == 'T' then
    ok = truncate(ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  else
    return redis.error_reply('redis views: unknown op ' .. tostring(op) .. ' at ARGV[' .. i .. ']')
  end
  if ok then applied = applied + 1 else skipped = skipped + 1 end
end
return { applied, skipped }
