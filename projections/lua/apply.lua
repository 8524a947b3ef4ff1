-- One batch of the Redis user views, applied atomically: guarded row writes
-- plus the Kafka positions they reflect. docs/redis-views.md describes the keys.
--
-- ARGV[1] namespace, ARGV[2] the batch: fields each ended by \31 (ASCII unit
-- separator, which JSON text never holds raw). One string instead of one
-- argument per field: packing tens of thousands of arguments costs the client
-- more than Lua's split costs the server. The fields: the number of positions
-- P, then P triples (field "topic:partition", offset, watermark; both 20-digit
-- zero-padded), then the ops, each an opcode followed by its fields
-- (projections/redis_views.py builds them):
--   C id rv act row m col ...          customers row upsert: row = the after-image
--                                      as compact JSON, then m unavailable columns
--   O id rv act cust status currency placed row m col ...   orders row upsert
--   c id rv | o id rv                  customers / orders row delete
--   I order k (line rv json) ...       k order_items rows of one order; json '' = delete
--   P order payment rv cents           payments row (signed cents; 'D' = delete)
--   T table rv                         truncate of a table
-- rv (row version) is the event version zero-padded to 25 digits followed by the
-- change's seq padded to 10: fixed width, so plain string comparison orders them
-- (versions exceed 2^53; Lua numbers are doubles). act is the row's updated_at
-- in µs since the epoch.
-- A row is stored whole as one JSON field (@row): every argument of a Redis
-- call costs, and a row has many columns.
-- Returns {row changes applied, row changes skipped as replayed or older}.

local call = redis.call
local sbyte, ssub, sfind = string.byte, string.sub, string.find
local ns = ARGV[1]
local TRUNC = ns .. ':truncated'
local ZERO = string.rep('0', 35)
local RECENT = 20

local F = {}
do
  local s, n, pos = ARGV[2], 0, 1
  while true do
    local j = sfind(s, '\031', pos, true)
    if not j then break end
    n = n + 1
    F[n] = ssub(s, pos, j - 1)
    pos = j + 1
  end
end

local trunc = {}
do
  local t = call('HGETALL', TRUNC)
  for i = 1, #t, 2 do trunc[t[i]] = t[i + 1] end
end

local function fresh(table_name, rv)
  local t = trunc[table_name]
  return not t or rv > t
end

local function neg(s)
  if sbyte(s, 1) == 45 then return ssub(s, 2) end
  return '-' .. s
end

-- A counter that returns to 0 keeps its field (at most one per status and
-- currency): deleting it would cost a call on most status changes.
local function incr(key, field, by)
  call('HINCRBY', key, field, by)
end

-- ---- JSON: the raw text of one top-level member of a compact object (orjson
-- output), without decoding it (cjson would round numbers to 14 digits).

local function skip_string(s, p)
  local i = p + 1
  while true do
    local j = sfind(s, '["\\]', i)
    if not j then return #s + 1 end
    if sbyte(s, j) == 92 then i = j + 2 else return j + 1 end
  end
end

local function skip_value(s, p)
  local b = sbyte(s, p)
  if b == 34 then return skip_string(s, p) end
  if b == 123 or b == 91 then
    local depth, i = 0, p
    while true do
      local j = sfind(s, '[%[%]{}"]', i)
      if not j then return #s + 1 end
      local c = sbyte(s, j)
      if c == 34 then
        i = skip_string(s, j)
      elseif c == 123 or c == 91 then
        depth, i = depth + 1, j + 1
      else
        depth, i = depth - 1, j + 1
        if depth == 0 then return i end
      end
    end
  end
  return sfind(s, '[,}%]]', p) or #s + 1
end

local function json_member(s, name)
  local want = '"' .. name .. '"'
  local p, n = 2, #s
  while p < n do
    local kend = skip_string(s, p)
    local vend = skip_value(s, kend + 1)
    if ssub(s, p, kend - 1) == want then return ssub(s, kend + 1, vend - 1) end
    p = vend + 1
  end
  return nil
end

-- ---- rows

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

-- Derived fields live beside a row in its hash and survive its delete.
local function is_row_field(f)
  return not (f == '@paid' or f == '@link'
    or ssub(f, 1, 3) == '@n:' or ssub(f, 1, 7) == '@spend:')
end

local function drop_row_fields(key)
  local h = call('HGETALL', key)
  local d = { key }
  for i = 1, #h, 2 do
    if is_row_field(h[i]) then d[#d + 1] = h[i] end
  end
  if #d > 1 then call('HDEL', unpack(d)) end
end

-- ---- per batch, not per op: the newest activity per customer, the ids to
-- index and the orders whose contribution to their customer must be
-- recomputed (relink is state-based, so once at the end of the batch is enough).

local last_seen, user_list, user_seen, order_list, order_seen = {}, {}, {}, {}, {}
local dirty_list, dirty_seen = {}, {}

-- act: updated_at in µs since the epoch (exact in a double until the year 2255)
local function activity(cust, act)
  if act == '' or cust == '' then return end
  local last = last_seen[cust]
  if not last or tonumber(act) > tonumber(last) then last_seen[cust] = act end
end

local function index_user(id)
  if not user_seen[id] then
    user_seen[id] = true
    user_list[#user_list + 1] = id
  end
end

local function index_order(id)
  if not order_seen[id] then
    order_seen[id] = true
    order_list[#order_list + 1] = id
  end
end

-- dirty_seen[oid]: true = relink at the end; false = already linked by its upsert
local function mark(oid)
  if dirty_seen[oid] == nil then dirty_list[#dirty_list + 1] = oid end
  dirty_seen[oid] = true
end

local function sadd_all(key, list)
  for k = 1, #list, 4000 do
    call('SADD', key, unpack(list, k, math.min(k + 3999, #list)))
  end
end

local function flush_index()
  sadd_all(ns .. ':users', user_list)
  sadd_all(ns .. ':orders', order_list)
  user_list, order_list = {}, {}
end

-- ---- the customer's derived view

-- Recent-list members: numeric ids zero-padded to 20 digits, so that orders
-- placed in the same µs rank by id (newest first), as numbers.
local function member(oid)
  if #oid < 20 and not sfind(oid, '%D') then return string.rep('0', 20 - #oid) .. oid end
  return oid
end

local function split_link(s)
  return string.match(s, '^(.*)|([^|]*)|([^|]*)|([^|]*)$')
end

-- The customer's counts, spend and recent list are sums over its orders: each
-- order records in @link what it currently contributes ("customer|status|
-- currency|cents"); when its state changes, the difference is applied. So a
-- replay (no state change) never counts twice.
local function link_of(cust, status, currency, paid)
  return cust .. '|' .. status .. '|' .. currency .. '|' .. (paid or '0')
end

-- Applies the difference between two links; the caller stores the new one.
local function relinked(oid, old, new, ts)
  if new == old then return end
  local oc, ost, ocur, ocents, nc, nst, ncur, ncents
  if old ~= '' then
    oc, ost, ocur, ocents = split_link(old)
  end
  if new ~= '' then
    nc, nst, ncur, ncents = split_link(new)
  end
  if old ~= '' then
    local ukey = ns .. ':user:' .. oc
    if ost ~= nst or oc ~= nc then incr(ukey, '@n:' .. ost, -1) end
    if ocents ~= '0' and (ocents ~= ncents or ocur ~= ncur or oc ~= nc) then
      incr(ukey, '@spend:' .. ocur, neg(ocents))
    end
  end
  if new ~= '' then
    local ukey = ns .. ':user:' .. nc
    if ost ~= nst or oc ~= nc then incr(ukey, '@n:' .. nst, 1) end
    if ncents ~= '0' and (ocents ~= ncents or ocur ~= ncur or oc ~= nc) then
      incr(ukey, '@spend:' .. ncur, ncents)
    end
    if nc ~= oc then
      local rkey = ukey .. ':recent'
      call('ZADD', rkey, ts or '0', member(oid))
      call('ZREMRANGEBYRANK', rkey, 0, -(RECENT + 1))
      index_user(nc)
    end
  end
  if old ~= '' and nc ~= oc then call('ZREM', ns .. ':user:' .. oc .. ':recent', member(oid)) end
end

local function relink(oid)
  local okey = ns .. ':order:' .. oid
  local f = call('HMGET', okey, '@link', '@v', '@del', '@c', '@s', '@cur', '@paid', '@ts')
  local old = f[1] or ''
  local new = ''
  if f[2] and not f[3] and f[4] and f[5] then new = link_of(f[4], f[5], f[6] or '', f[7]) end
  if new == old then return end
  relinked(oid, old, new, f[8])
  if new ~= '' then call('HSET', okey, '@link', new) else call('HDEL', okey, '@link') end
end

-- Last-writer-wins by row version. A column absent from a newer write (an
-- unchanged TOAST value) keeps its value, moved out of @row into its own field
-- "c:<column>", and @lag remembers the version that value is from, so an older
-- write may still fill it in: any delivery order converges.
-- Orders (`oid` given) carry in `extra` what their link is made of (customer,
-- status, currency, placed_at; '' = keep the stored one) and are linked right
-- here, in the same calls as the row write, when all of it is known.
local function upsert(key, rv, row, ui, m, extra, oid)
  local st
  if oid then
    st = call('HMGET', key, '@v', '@del', '@lag', '@link', '@paid')
  else
    st = call('HMGET', key, '@v', '@del', '@lag')
  end
  local cur, del, lag_s = st[1], st[2], st[3]
  if cur and rv <= cur then
    if rv == cur or del or not lag_s then return false end
    local lag = parse_lag(lag_s)
    local args = { key }
    for c, lv in pairs(lag) do
      if rv > lv then
        local v = json_member(row, c)
        if v then
          args[#args + 1] = 'c:' .. c
          args[#args + 1] = v
          lag[c] = rv
        end
      end
    end
    if #args == 1 then return false end
    args[#args + 1] = '@lag'
    args[#args + 1] = format_lag(lag)
    call('HSET', unpack(args))
    return true
  end
  local args = { key, '@v', rv, '@row', row }
  if extra then
    for k = 1, #extra, 2 do
      if extra[k + 1] ~= '' then
        args[#args + 1] = extra[k]
        args[#args + 1] = extra[k + 1]
      end
    end
  end
  if oid then
    if extra[2] ~= '' and extra[4] ~= '' and extra[8] ~= '' then
      local old_link = st[4] or ''
      local new_link = link_of(extra[2], extra[4], extra[6], st[5])
      relinked(oid, old_link, new_link, extra[8])
      if new_link ~= old_link then
        args[#args + 1] = '@link'
        args[#args + 1] = new_link
      end
      if dirty_seen[oid] then dirty_seen[oid] = false end
    else
      mark(oid)
    end
  end
  local old = lag_s and parse_lag(lag_s) or {}
  local gone = { key }
  local new_lag = nil
  if m > 0 then
    local lag = {}
    local old_row, fetched = nil, false
    for k = ui, ui + m - 1 do
      local c = F[k]
      if old[c] then
        lag[c] = old[c]
      else
        if not fetched then
          fetched = true
          if cur and not del then old_row = call('HGET', key, '@row') end
        end
        local v = old_row and json_member(old_row, c)
        if v then
          args[#args + 1] = 'c:' .. c
          args[#args + 1] = v
          lag[c] = cur
        else
          lag[c] = ZERO
        end
      end
    end
    new_lag = format_lag(lag)
    args[#args + 1] = '@lag'
    args[#args + 1] = new_lag
    for c in pairs(old) do
      if not lag[c] then gone[#gone + 1] = 'c:' .. c end
    end
  else
    for c in pairs(old) do gone[#gone + 1] = 'c:' .. c end
    if lag_s then gone[#gone + 1] = '@lag' end
  end
  if del then gone[#gone + 1] = '@del' end
  if #gone > 1 then call('HDEL', unpack(gone)) end
  call('HSET', unpack(args))
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

local function flush()
  for _, oid in ipairs(dirty_list) do
    if dirty_seen[oid] then relink(oid) end
  end
  -- one ZADD GT for the whole batch: the score only ever grows
  local args, n = { ns .. ':last', 'GT' }, 0
  for cust, act in pairs(last_seen) do
    args[#args + 1] = act
    args[#args + 1] = cust
    n = n + 1
    if n == 3000 then
      call('ZADD', unpack(args))
      args, n = { ns .. ':last', 'GT' }, 0
    end
  end
  if n > 0 then call('ZADD', unpack(args)) end
  flush_index()
end

-- ---- child rows: items and payments, packed as "rv|value" in one hash per
-- order; an empty value (items) or "D" (payments) is a tombstone.

-- k item rows of one order at F[at..]: one HMGET and one HSET for all of them.
local function items_write(oid, at, k)
  local key = ns .. ':order:' .. oid .. ':items'
  local q = { key }
  for j = 0, k - 1 do q[j + 2] = F[at + 3 * j] end
  local old = call('HMGET', unpack(q))
  local args = { key }
  local newest = {}
  local done = 0
  for j = 0, k - 1 do
    local line, rv = F[at + 3 * j], F[at + 3 * j + 1]
    local have = newest[line] or (old[j + 1] and ssub(old[j + 1], 1, 35))
    if fresh('order_items', rv) and (not have or rv > have) then
      newest[line] = rv
      args[#args + 1] = line
      args[#args + 1] = rv .. '|' .. F[at + 3 * j + 2]
      done = done + 1
    end
  end
  if #args > 1 then call('HSET', unpack(args)) end
  return done
end

local function payment_write(oid, pid, rv, cents)
  local okey = ns .. ':order:' .. oid
  local pkey = okey .. ':pay'
  local old = call('HGET', pkey, pid)
  if old and rv <= ssub(old, 1, 35) then return false end
  call('HSET', pkey, pid, rv .. '|' .. cents)
  local was = (old and ssub(old, 37)) or 'D'
  if was ~= cents then
    if was ~= 'D' and was ~= '0' then incr(okey, '@paid', neg(was)) end
    if cents ~= 'D' and cents ~= '0' then incr(okey, '@paid', cents) end
    mark(oid)
  end
  return true
end

-- ---- truncate: rows older than the truncate go (no tombstone: the table's
-- truncate version in ns:truncated rejects older writes from now on); rows
-- already rewritten after it stay, minus column values only known from before it.

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
          gone[#gone + 1] = 'c:' .. c
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
  flush_index()
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

-- ---- positions: the offset and the watermark of a partition never move backwards

-- Written last: a script that fails half-way (Redis does not roll back the
-- writes before the error) leaves the positions where they were, so the batch
-- is delivered again and the guards make the replay harmless.
local npos = tonumber(F[1])
local function store_positions()
  if npos == 0 then return end
  local pkey = ns .. ':positions'
  local q = { pkey }
  for k = 0, npos - 1 do q[#q + 1] = F[2 + 3 * k] end
  local old = call('HMGET', unpack(q))
  local args = { pkey }
  for k = 0, npos - 1 do
    local off, wm = F[2 + 3 * k + 1], F[2 + 3 * k + 2]
    local o = old[k + 1]
    if o then
      local ooff, owm = ssub(o, 1, 20), ssub(o, 22, 41)
      if ooff > off then off = ooff end
      if owm > wm then wm = owm end
    end
    args[#args + 1] = F[2 + 3 * k]
    args[#args + 1] = off .. ' ' .. wm
  end
  call('HSET', unpack(args))
end

-- ---- the ops

local i = 2 + 3 * npos

local applied, skipped = 0, 0
local nargs = #F
while i <= nargs do
  local op = F[i]
  local ok = false
  if op == 'O' then
    local id, rv, act, cust = F[i + 1], F[i + 2], F[i + 3], F[i + 4]
    local m = tonumber(F[i + 9])
    index_order(id)
    if cust ~= '' then
      index_user(cust)
      activity(cust, act)
    end
    if fresh('orders', rv) then
      local extra = { '@c', cust, '@s', F[i + 5], '@cur', F[i + 6], '@ts', F[i + 7] }
      ok = upsert(ns .. ':order:' .. id, rv, F[i + 8], i + 10, m, extra, id)
    end
    i = i + 10 + m
  elseif op == 'I' then
    local oid, k = F[i + 1], tonumber(F[i + 2])
    index_order(oid)
    local done = items_write(oid, i + 3, k)
    applied = applied + done
    skipped = skipped + k - done
    i = i + 3 + 3 * k
    ok = nil
  elseif op == 'P' then
    local oid = F[i + 1]
    index_order(oid)
    if fresh('payments', F[i + 3]) then
      ok = payment_write(oid, F[i + 2], F[i + 3], F[i + 4])
    end
    i = i + 5
  elseif op == 'C' then
    local id, rv, act = F[i + 1], F[i + 2], F[i + 3]
    local m = tonumber(F[i + 5])
    index_user(id)
    activity(id, act)
    if fresh('customers', rv) then
      ok = upsert(ns .. ':user:' .. id, rv, F[i + 4], i + 6, m, nil, nil)
    end
    i = i + 6 + m
  elseif op == 'o' then
    local id, rv = F[i + 1], F[i + 2]
    index_order(id)
    if fresh('orders', rv) then
      ok = delete(ns .. ':order:' .. id, rv)
      if ok then mark(id) end
    end
    i = i + 3
  elseif op == 'c' then
    local id, rv = F[i + 1], F[i + 2]
    index_user(id)
    if fresh('customers', rv) then ok = delete(ns .. ':user:' .. id, rv) end
    i = i + 3
  elseif op == 'T' then
    ok = truncate(F[i + 1], F[i + 2])
    i = i + 3
  else
    return redis.error_reply('redis views: unknown op ' .. tostring(op) .. ' at field ' .. i)
  end
  if ok then
    applied = applied + 1
  elseif ok == false then
    skipped = skipped + 1
  end
end
flush()
store_positions()
return { applied, skipped }
