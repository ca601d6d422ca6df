-- ticketlock v2: helpers shared by every operation script.
--
-- An operation is sent to Redis as this file followed by the operation's own
-- file (the crate, `ticketlock scripts show` and the Python package all
-- concatenate them the same way), so every rule below exists exactly once.
--
-- Data model: ONE hash per conversation, KEYS[1] = <prefix>{<id>}, where <id>
-- is the conversation id with `%`, `{` and `}` percent-encoded (`%25`, `%7B`,
-- `%7D`, so the id is always one Redis Cluster hash tag) and <prefix> is
-- `lock:` or `<custom>:lock:`. Its fields:
--   next   "v2": marks the record. A v1 script refuses it (v1 keeps a number
--          there), and a v2 script refuses any record where it is not "v2".
--   n      number the next ticket gets (0, 1, 2 ...; at most MAX_TICKET)
--   e      epoch: Redis time (us) the record was created
--   h      every ticket numbered below h is gone: the head (the ticket served)
--          is the lowest live ticket at or above h
--   s      the ticket granted last, -1 before the first grant
--   f      that grant's fencing token: max(previous + 1, Redis time in us),
--          so tokens grow over every grant, even across a deleted or expired
--          record (while Redis's clock does)
--   g      when that grant was made (ms) while its owner has not picked it up
--          yet; 0 once it has
--   t<k>   ticket k: "<expiry ms> <lease ms> <liveness ms>[ <request>]"
--          (lease and liveness are 0 for a fixed ticket; <request> is the id
--          its issue carried, if any)
--   x      requests cancelled before their issue ran: "<request> <until ms>"
--          pairs, space-separated (absent when there are none)
-- A record made only by cancel.lua holds just `next` and `x`.
--
-- Two kinds of ticket:
--   fixed     (issue without liveness; Rasa's issue_ticket) expires `lifetime`
--             after it was issued, waiting included;
--   renewing  (issue with liveness; what `lock` takes) expires `liveness` after
--             its waiter last polled, so a live waiter waits as long as it
--             likes and a dead one stops blocking the queue within `liveness`.
--             When granted, its owner must pick the grant up (a poll, or the
--             owner's own issue) before the ticket's waiting expiry; from then
--             its lease runs `lease` ms counted from the grant, and the owner
--             may extend it. A wake-up naming the owner's ticket is enough to
--             start work, but the owner must still poll before its waiting
--             ticket would have expired, or the grant lapses.
--
-- The acquire loop every client runs (the Rust crate, the Python package):
--   1. issue (with liveness and a request id); if now_serving == ticket, it
--      holds the lock. If the issue's outcome is unknown (timeout, lost
--      connection), send cancel.lua with the same request id: it gives the
--      ticket back whichever way the race went;
--   2. SUBSCRIBE to the channel, then poll (so a hand-over is either in the
--      poll's answer or pushed afterwards);
--   3. until served or gone: wait for a wake-up, the served ticket's expiry
--      (head_remaining_ms / serving_ms), or the next check-in (at most a
--      third of liveness, and half the ticket's own remaining life), then
--      poll; a wake-up naming our ticket and epoch means served (pick the
--      grant up with a poll soon), one naming a lower ticket means keep
--      waiting, anything else (our ticket or -2 removed, nobody served,
--      another epoch) means poll now;
--   4. release with mode "cleanup", the epoch and the grant's fencing token.
--
-- Wake-ups are PUBLISHed (SPUBLISHed on Redis Cluster: see PUBLISH below) on
-- the channel named like the key, as
-- "<epoch> <serving> <fence> <removed> <serving_ms>" (integers, -1 for none):
-- the ticket served now with its fencing token, a waiting ticket someone else
-- removed (-2: several were), and the ms until the served ticket expires.
-- They go out when a grant is made, when a ticket is removed by someone other
-- than its owner (so a waiter learns at once that it is gone, and a holder
-- that it lost the lock), and when the served ticket's expiry moves earlier
-- while others wait (so they check then, should its owner be dead).
--
-- Invariants every script keeps:
--   * the ticket served is the lowest live number (strict FIFO);
--   * a ticket is live while Redis time <= its expiry; the head is found by
--     dropping expired tickets from the front, so an expired one is never
--     served (tickets behind the head expire where they stand and are
--     dropped when met);
--   * numbers only go up within a record (epoch); a new record gets a new
--     epoch; no number above MAX_TICKET is ever issued;
--   * fencing tokens only go up, one per grant;
--   * the key expires MARGIN_MS after the latest expiry any of its tickets
--     was given (never earlier; PEXPIREAT ... GT);
--   * every read happens before the first write: a script that refuses
--     (foreign data, bad arguments) has changed nothing;
--   * clock() runs before the first read (the differential tests' manual
--     clock drops keys whose time is up right there, as Redis would have).

local MARGIN_MS = 1000
-- The command wake-ups go out with. For Redis Cluster the crate replaces
-- 'PUBLISH' by 'SPUBLISH' on this one line (sharded pub/sub: a wake-up stays
-- on the conversation's own shard); nothing else differs.
local PUBLISH = 'PUBLISH'
local MAX_LIFETIME_MS = 31536000000 -- 365 days
-- Lua numbers are doubles: integers are exact up to 2^53. The one bound on
-- ticket numbers; issue refuses to go past it, save refuses numbers above it.
local MAX_TICKET = 9007199254740991
-- Tickets read per HMGET while looking for the head.
local SCAN = 16

-- An integer as Redis and other clients expect it: Lua's own number-to-string
-- (%.14g) would write large ones in exponent notation.
local function int(x)
  return string.format('%d', x)
end

local function clock()
  local t = redis.call('TIME')
  -- Digits only, so arithmetic converts them (tonumber would parse twice).
  local s, us = t[1] + 0, t[2] + 0
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end

local function refuse(key, what)
  error({ err = 'WRONGTYPE ticketlock: key ' .. key .. ' ' .. what })
end

local function integer_arg(value, name, min, max)
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or n < min or n > max then
    error({ err = 'ERR ticketlock: ' .. name .. ' must be an integer in ' .. int(min) .. '..' .. int(max) .. ', got ' .. tostring(value) })
  end
  return n
end

-- A client-chosen request id: 1-64 letters, digits, '-' or '_'; "" for none.
local function request_arg(value)
  if value == nil or value == '' then return '' end
  if #value > 64 or not string.match(value, '^[%w_%-]+$') then
    error({ err = 'ERR ticketlock: request id must be 1-64 letters, digits, - or _, got ' .. tostring(value) })
  end
  return value
end

local NUMBERS = { 'n', 'e', 'h', 's', 'f', 'g' }

-- The record's numbers, by arithmetic: one parse each (tonumber parses a
-- string twice, and the epoch and fence have 16 digits). Raises on a field
-- that is not an integer (`% 1` is NaN for an infinity, so that one too);
-- load then names it.
local function convert(v, m)
  for i = 1, 6 do
    local raw = v[i + 1]
    if raw then
      local number = raw + 0
      if number % 1 ~= 0 then error('not an integer') end
      m[NUMBERS[i]] = number
    end
  end
end

-- The record, read in one HMGET with any ticket fields the script names in
-- `extra` (returned in m.extra, in order). Refuses foreign data before
-- anything is written: a key of another type fails here (WRONGTYPE), and so
-- does a hash that is not a v2 record or holds a non-number where a number
-- belongs. m.exists is false when there is no record (no key, or a key made
-- only by cancel.lua).
local function load(key, extra)
  local v
  if extra then
    v = redis.call('HMGET', key, 'next', 'n', 'e', 'h', 's', 'f', 'g', 'x', unpack(extra))
  else
    v = redis.call('HMGET', key, 'next', 'n', 'e', 'h', 's', 'f', 'g', 'x')
  end
  if v[1] and v[1] ~= 'v2' then
    refuse(key, 'holds data of another ticketlock version or another program (field next = ' .. tostring(v[1]) .. '); stop the clients that wrote it, or delete the key')
  end
  -- Every field named up front, nil or not: the table is sized once.
  local m = { key = key, present = v[1] ~= false, x = v[8] or nil, extra = {},
              n = nil, e = nil, h = nil, s = nil, f = nil, g = nil, exists = nil }
  if not pcall(convert, v, m) then
    for i = 1, 6 do
      local number = tonumber(v[i + 1] or 0)
      if not number or number % 1 ~= 0 then
        refuse(key, 'field ' .. NUMBERS[i] .. ' holds ' .. tostring(v[i + 1]) .. ', not an integer')
      end
    end
  end
  m.exists = m.e ~= nil
  if m.exists and not (m.n and m.h and m.s and m.f and m.g) then
    refuse(key, 'is a record without its fields n, h, s, f and g')
  end
  if extra then
    for i = 1, #extra do m.extra[i] = v[8 + i] end
  end
  return m
end

-- When ticket `t` ends: its stored expiry; but a grant not picked up yet
-- ends at its waiting expiry or when its lease would end (counted from the
-- grant), whichever comes first. Waiters are told that time, and picking the
-- grant up never moves it earlier.
local function effective(m, t)
  t.at = t.stored
  if t.number == m.s and m.g ~= 0 and t.lease > 0 then t.at = math.min(t.stored, m.g + t.lease) end
  return t
end

-- Ticket `number`'s field value parsed, or nil when it has none.
local function parse(m, number, value)
  if not value then return nil end
  local at, lease, liveness, request = string.match(value, '^(%d+) (%d+) (%d+) ?([%w_%-]*)$')
  if not at then
    refuse(m.key, 'holds ticket ' .. int(number) .. ' as ' .. tostring(value) .. ', not "<expiry> <lease> <liveness>[ <request>]"')
  end
  -- The pattern matched digits only: `+ 0` converts them (tonumber would
  -- parse twice). `at` is named so the table is sized once.
  local t = { number = number, stored = at + 0, lease = lease + 0, liveness = liveness + 0, request = request, at = nil }
  return effective(m, t)
end

-- Every ticket of the record, parsed (with its hash field and raw value), in
-- no particular order: one HGETALL, for the scripts that must see them all.
local function all_tickets(m)
  local tickets = {}
  if not m.exists then return tickets end
  local all = redis.call('HGETALL', m.key)
  for i = 1, #all, 2 do
    local number = string.match(all[i], '^t(%d+)$')
    if number then
      local t = parse(m, tonumber(number), all[i + 1])
      t.field, t.value = all[i], all[i + 1]
      tickets[#tickets + 1] = t
    end
  end
  return tickets
end

local function format(t)
  local text = int(t.at) .. ' ' .. int(t.lease) .. ' ' .. int(t.liveness)
  if t.request ~= '' then text = text .. ' ' .. t.request end
  return text
end

-- Writes are collected while deciding and sent at the end: one HDEL, then
-- one HSET (so a field deleted and set again ends up set).
local function writes()
  return { set = {}, del = {} }
end

local function set(w, field, value)
  -- As a string: Redis formats a number argument as a double, at a higher cost.
  if type(value) == 'number' then value = int(value) end
  local n = #w.set
  w.set[n + 1], w.set[n + 2] = field, value
end

local function commit(key, w)
  -- unpack() is bounded by Lua's C stack, so send long lists in slices.
  for i = 1, #w.del, 1000 do
    redis.call('HDEL', key, unpack(w.del, i, math.min(i + 999, #w.del)))
  end
  for i = 1, #w.set, 1000 do
    redis.call('HSET', key, unpack(w.set, i, math.min(i + 999, #w.set)))
  end
end

-- The key lives until MARGIN_MS after `at` at least; never shortened, since
-- another ticket may live longer. A key made by this script has no TTL yet
-- (GT would treat it as infinite), so it gets one outright.
local function expire_at(key, at, made)
  if made then
    redis.call('PEXPIREAT', key, int(at + MARGIN_MS))
  else
    redis.call('PEXPIREAT', key, int(at + MARGIN_MS), 'GT')
  end
end

-- The lowest live ticket at or above m.h and below m.n, skipping `leaving`
-- (a ticket this script removes). Expired tickets met on the way are added
-- to `dead`. `known` maps numbers to field values already read (false: no
-- field). Returns the number (-1 for none) and the parsed ticket.
local function scan(m, now, leaving, dead, known)
  local k = m.h
  while k < m.n do
    local last = math.min(k + SCAN - 1, m.n - 1)
    local values
    if known and known[k] ~= nil then
      values, last = { known[k] }, k
    else
      local names = {}
      for i = k, last do names[#names + 1] = 't' .. int(i) end
      values = redis.call('HMGET', m.key, unpack(names))
    end
    for i = 1, last - k + 1 do
      local number = k + i - 1
      if number ~= leaving and values[i] then
        local t = parse(m, number, values[i])
        if t.at >= now then return number, t end
        dead[#dead + 1] = number
      end
    end
    k = last + 1
  end
  return -1, nil
end

local function next_fence(previous, now_us)
  if previous and now_us <= previous then return previous + 1 end
  return now_us
end

-- The head becomes the holder, if it is not already: a new fencing token,
-- granted now, not yet picked up. The record's cursor moves to the head (or
-- past the last number when the queue is empty). Updates m; queues the writes.
-- Returns true when a new grant was made.
local function grant(m, w, head, now, now_us)
  if head == -1 then
    if m.h ~= m.n then
      m.h = m.n
      set(w, 'h', m.n)
    end
    return false
  end
  if head ~= m.h then
    m.h = head
    set(w, 'h', head)
  end
  if head == m.s then return false end
  m.s, m.f, m.g = head, next_fence(m.f, now_us), now
  set(w, 's', head)
  set(w, 'f', m.f)
  set(w, 'g', now)
  return true
end

-- Finds the head, dropping expired tickets (and `leaving`) on the way, and
-- grants it. Returns the head (-1 for none), its ticket, and whether a new
-- grant was made.
local function settle(m, w, now, now_us, leaving, known)
  local dead = {}
  local head, ticket = scan(m, now, leaving, dead, known)
  for _, d in ipairs(dead) do w.del[#w.del + 1] = 't' .. int(d) end
  local granted = grant(m, w, head, now, now_us)
  -- A new grant ends when its lease from now would, if that comes first.
  if granted then effective(m, ticket) end
  return head, ticket, granted
end

local function announce(m, serving, removed, left)
  local fence = -1
  if serving ~= -1 then fence = m.f end
  redis.call(PUBLISH, m.key, int(m.e) .. ' ' .. int(serving) .. ' ' .. int(fence) .. ' ' .. int(removed) .. ' ' .. int(left))
end

-- The owner of the served ticket `number` has it: a renewing ticket's lease
-- now runs from the grant. Its expiry only moves later: before the pick-up,
-- parse already ended it at the latest when the lease from the grant would.
-- Returns the ticket's expiry.
local function confirm(m, w, number, ticket)
  if m.g == 0 then return ticket.at end
  local granted_at = m.g
  m.g = 0
  set(w, 'g', 0)
  if ticket.lease > 0 then
    ticket.at = granted_at + ticket.lease
    set(w, 't' .. int(number), format(ticket))
    if ticket.at > ticket.stored then w.expiry = ticket.at end
  end
  return ticket.at
end

-- Requests remembered in x, less `request` and the expired ones. Returns the
-- new value ('' for none) and whether `request` was there.
local function forget_request(x, request, now)
  local kept, found = {}, false
  for id, untilms in string.gmatch(x or '', '(%S+) (%d+)') do
    if id == request then
      found = true
    elseif tonumber(untilms) >= now then
      kept[#kept + 1] = id .. ' ' .. untilms
    end
  end
  return table.concat(kept, ' '), found
end

-- Deletes the record; cancelled requests not yet met stay remembered (a late
-- issue must still find them), in a key made anew.
local function drop(m, now)
  redis.call('DEL', m.key)
  local x = forget_request(m.x, '', now)
  if x ~= '' then
    local last = 0
    for untilms in string.gmatch(x, '%S+ (%d+)') do last = math.max(last, tonumber(untilms)) end
    redis.call('HSET', m.key, 'next', 'v2', 'x', x)
    expire_at(m.key, last, true)
  end
end

-- Removes ticket `number` (whose field value is `value`, already read) and
-- hands the lock on: the body of release.lua and cancel.lua.
--   mode   "finish" keeps the record; "cleanup" deletes it when no live
--          ticket is left
--   owner  true when the caller owns the ticket (it issued or holds it), so
--          nobody needs telling that it left; false for an admin removal,
--          whose ticket's owner (a waiter, or the holder) is told at once
--   known  field values already read (see scan)
-- Returns { removed, now_serving }: removed is 1 if the ticket was live and
-- is gone now, 0 if it was not there or had already expired (a holder whose
-- lease had lapsed learns so).
local function leave(m, number, value, mode, owner, now, now_us, known)
  local ticket = parse(m, number, value)
  local removed = 0
  if ticket and ticket.at >= now then removed = 1 end
  local was_served = ticket ~= nil and number == m.s
  local w = writes()
  if ticket then w.del[#w.del + 1] = 't' .. int(number) end
  -- Find the next head before writing anything (it may refuse foreign data).
  local before = m.s
  local leaving = nil
  if ticket then leaving = number end
  local head, next_ticket, granted = settle(m, w, now, now_us, leaving, known)
  if head == -1 and mode == 'cleanup' then
    drop(m, now)
    if was_served and not owner then announce(m, -1, -1, -1) end
    return { removed, -1 }
  end
  commit(m.key, w)
  local waiter = -1
  if ticket and number ~= before and not owner then waiter = number end
  if granted or waiter ~= -1 or (head == -1 and was_served and not owner) then
    local left = -1
    if next_ticket then left = next_ticket.at - now end
    announce(m, head, waiter, left)
  end
  return { removed, head }
end
