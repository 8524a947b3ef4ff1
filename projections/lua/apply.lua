-- One batch of the Redis user views (or one part of it), applied atomically:
-- guarded row writes plus the Kafka positions they reflect (in the last part).
-- docs/redis-views.md describes the keys.
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
--   c id rv                            customers row delete
--   G order ROW np (payment rv cents)... ni (line rv json)...
--                                      the orders, payments and order_items rows
--                                      of one order in one event, applied with
--                                      one HMGET and one HSET; ROW is one of
--                                        O rv act cust status currency placed row m col ...
--                                        o rv   (delete)
--                                        -      (no orders row)
--                                      cents: signed, 'D' = deleted; json '' = deleted
--   T table rv                         truncate of a table
-- rv (row version) is the event version zero-padded to 25 digits followed by the
-- change's seq padded to 10: fixed width, so plain string comparison orders them
-- (versions exceed 2^53; Lua numbers are doubles). act is the row's updated_at
-- in µs since the epoch.
-- A row is stored whole as one JSON field (@row): every argument of a Redis
-- call costs, and a row has many columns.
-- ARGV[3..5], for a batch applied in parts (several scripts in one pipeline;
-- projections/redis_views.py): a token of the batch, this part's number k and
-- the number of parts n. Part k > 1 runs only if part k - 1 succeeded (it left
-- ns:part:<token> = k - 1); only the last part carries positions.
-- Returns {row changes applied, row changes skipped as replayed or older}.

local call = redis.call
local sbyte, ssub, sfind = string.byte, string.sub, string.find
local ns = ARGV[1]
local gate, part, parts = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
if gate then
  gate = ns .. ':part:' .. gate
  if part > 1 and call('GET', gate) ~= tostring(part - 1) then
    return redis.error_reply('redis views: part ' .. part .. ' of ' .. parts .. ' of a batch '
      .. 'not applied: the part before it failed (the batch is delivered again)')
  end
end
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

-- Derived fields and child rows (i:<line>, p:<payment>) live beside a row in
-- its hash and survive its delete.
local function is_row_field(f)
  local two = ssub(f, 1, 2)
  return not (f == '@paid' or f == '@link' or two == 'i:' or two == 'p:'
    or ssub(f, 1, 3) == '@n:' or ssub(f, 1, 7) == '@spend:')
end

local function commit(set, gone)
  if #gone > 1 then call('HDEL', unpack(gone)) end
  if #set > 1 then call('HSET', unpack(set)) end
end

local function drop_row_fields(key)
  local h = call('HGETALL', key)
  local d = { key }
  for i = 1, #h, 2 do
    if is_row_field(h[i]) then d[#d + 1] = h[i] end
  end
  if #d > 1 then call('HDEL', unpack(d)) end
end

-- ---- per batch, not per op: the newest activity per customer and the ids to index

local last_seen, user_list, user_seen, order_list, order_seen = {}, {}, {}, {}, {}

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
-- Adds the write to `set` (field, value pairs of one HSET) and `gone` (fields
-- to HDEL), given the stored @v, @del and @lag; returns 'new' (a newer write),
-- 'fill' (an older one filled lagging columns) or nil (nothing to do).
local function row_write(key, rv, row, ui, m, cur, del, lag_s, set, gone)
  if cur and rv <= cur then
    if rv == cur or del or not lag_s then return nil end
    local lag = parse_lag(lag_s)
    local filled = false
    for c, lv in pairs(lag) do
      if rv > lv then
        local v = json_member(row, c)
        if v then
          set[#set + 1] = 'c:' .. c
          set[#set + 1] = v
          lag[c] = rv
          filled = true
        end
      end
    end
    if not filled then return nil end
    set[#set + 1] = '@lag'
    set[#set + 1] = format_lag(lag)
    return 'fill'
  end
  set[#set + 1] = '@v'
  set[#set + 1] = rv
  set[#set + 1] = '@row'
  set[#set + 1] = row
  local old = lag_s and parse_lag(lag_s) or {}
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
          set[#set + 1] = 'c:' .. c
          set[#set + 1] = v
          lag[c] = cur
        else
          lag[c] = ZERO
        end
      end
    end
    set[#set + 1] = '@lag'
    set[#set + 1] = format_lag(lag)
    for c in pairs(old) do
      if not lag[c] then gone[#gone + 1] = 'c:' .. c end
    end
  else
    for c in pairs(old) do gone[#gone + 1] = 'c:' .. c end
    if lag_s then gone[#gone + 1] = '@lag' end
  end
  if del then gone[#gone + 1] = '@del' end
  return 'new'
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

-- ---- an order: its row, its payments (p:<id> = "rv|cents", 'D' = deleted)
-- and its items (i:<line> = "rv|json", '' = deleted) in one hash, so that an
-- event's rows cost one HMGET and one HSET, plus what its link changes.

local function set_child(set, newest, prefix, id, rv, value, stored, table_name)
  local old = newest[id] or stored
  if not fresh(table_name, rv) or (old and rv <= ssub(old, 1, 35)) then return nil end
  local packed = rv .. '|' .. value
  newest[id] = packed
  set[#set + 1] = prefix .. id
  set[#set + 1] = packed
  return old and ssub(old, 37) or 'D'
end

-- Returns the index of the next op, the row changes applied and those skipped.
local function order_group(i)
  local oid = F[i + 1]
  local okey = ns .. ':order:' .. oid
  local kind = F[i + 2]
  local rv, m, j = F[i + 3], 0, i + 3
  if kind == 'O' then
    m = tonumber(F[i + 10])
    j = i + 11 + m
    if F[i + 5] ~= '' then
      index_user(F[i + 5])
      activity(F[i + 5], F[i + 4])
    end
  elseif kind == 'o' then
    j = i + 4
  end
  index_order(oid)
  local np = tonumber(F[j])
  local pj = j + 1
  j = pj + 3 * np
  local ni = tonumber(F[j])
  local ij = j + 1
  j = ij + 3 * ni

  local q = { okey, '@v', '@del', '@lag', '@link', '@paid', '@c', '@s', '@cur', '@ts' }
  for k = 0, np - 1 do q[#q + 1] = 'p:' .. F[pj + 3 * k] end
  for k = 0, ni - 1 do q[#q + 1] = 'i:' .. F[ij + 3 * k] end
  local st = call('HMGET', unpack(q))
  local cur, del, lag_s, link, paid = st[1], st[2], st[3], st[4] or '', st[5] or '0'
  local lc, ls, lcur, lts = st[6], st[7], st[8], st[9]
  local set, gone = { okey }, { okey }
  local done, total = 0, np + ni

  local paid_n = nil
  local newest = {}
  for k = 0, np - 1 do
    local cents = F[pj + 3 * k + 2]
    local was = set_child(set, newest, 'p:', F[pj + 3 * k], F[pj + 3 * k + 1], cents, st[10 + k], 'payments')
    if was then
      done = done + 1
      if was ~= cents then
        paid_n = paid_n or tonumber(paid)
        if was ~= 'D' then paid_n = paid_n - tonumber(was) end
        if cents ~= 'D' then paid_n = paid_n + tonumber(cents) end
      end
    end
  end
  newest = {}
  for k = 0, ni - 1 do
    local b = ij + 3 * k
    if set_child(set, newest, 'i:', F[b], F[b + 1], F[b + 2], st[10 + np + k], 'order_items') then
      done = done + 1
    end
  end

  local live = cur and not del
  if kind == 'O' then
    total = total + 1
    if fresh('orders', rv) then
      local r = row_write(okey, rv, F[i + 9], i + 11, m, cur, del, lag_s, set, gone)
      if r then done = done + 1 end
      if r == 'new' then
        live = true
        local fields = { '@c', '@s', '@cur', '@ts' }
        local now = { lc, ls, lcur, lts }
        for k = 1, 4 do
          local v = F[i + 4 + k]
          if v ~= '' and v ~= now[k] then
            set[#set + 1] = fields[k]
            set[#set + 1] = v
            now[k] = v
          end
        end
        lc, ls, lcur, lts = now[1], now[2], now[3], now[4]
      end
    end
  elseif kind == 'o' then
    total = total + 1
    if fresh('orders', rv) and (not cur or rv > cur) then
      drop_row_fields(okey)
      set[#set + 1] = '@v'
      set[#set + 1] = rv
      set[#set + 1] = '@del'
      set[#set + 1] = '1'
      live = false
      done = done + 1
    end
  end

  if paid_n then
    -- exact: integer cents stay far below 2^53
    paid = string.format('%d', paid_n)
    set[#set + 1] = '@paid'
    set[#set + 1] = paid
  end
  local new_link = ''
  if live and lc and ls then new_link = link_of(lc, ls, lcur or '', paid) end
  if new_link ~= link then
    relinked(oid, link, new_link, lts)
    if new_link ~= '' then
      set[#set + 1] = '@link'
      set[#set + 1] = new_link
    else
      gone[#gone + 1] = '@link'
    end
  end
  commit(set, gone)
  return j, done, total - done
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

local function truncate_children(prefix, rv, is_pay)
  for _, oid in ipairs(call('SMEMBERS', ns .. ':orders')) do
    local okey = ns .. ':order:' .. oid
    local h = call('HGETALL', okey)
    local gone = { okey }
    local paid, delta = 0, 0
    for i = 1, #h, 2 do
      local f, packed = h[i], h[i + 1]
      if f == '@paid' then
        paid = tonumber(packed)
      elseif ssub(f, 1, 2) == prefix and ssub(packed, 1, 35) < rv then
        gone[#gone + 1] = f
        local cents = ssub(packed, 37)
        if is_pay and cents ~= 'D' then delta = delta + tonumber(cents) end
      end
    end
    if #gone > 1 then call('HDEL', unpack(gone)) end
    if delta ~= 0 then
      call('HSET', okey, '@paid', string.format('%d', paid - delta))
      relink(oid)
    end
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
    truncate_children('i:', rv, false)
  elseif table_name == 'payments' then
    truncate_children('p:', rv, true)
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
  if op == 'G' then
    local done, skip
    i, done, skip = order_group(i)
    applied = applied + done
    skipped = skipped + skip
    ok = nil
  elseif op == 'C' then
    local id, rv, act = F[i + 1], F[i + 2], F[i + 3]
    local m = tonumber(F[i + 5])
    index_user(id)
    activity(id, act)
    if fresh('customers', rv) then
      local key = ns .. ':user:' .. id
      local st = call('HMGET', key, '@v', '@del', '@lag')
      local set, gone = { key }, { key }
      ok = row_write(key, rv, F[i + 4], i + 6, m, st[1], st[2], st[3], set, gone) ~= nil
      commit(set, gone)
    end
    i = i + 6 + m
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
if gate then
  if part < parts then call('SET', gate, part, 'EX', 3600) else call('DEL', gate) end
end
return { applied, skipped }
