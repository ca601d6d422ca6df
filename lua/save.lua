-- ticketlock save: replace one conversation's queue with the given tickets.
-- Serves save_lock. (Rust: Backend::save; in memory: State::save.)
--
-- KEYS[1] the conversation's key   (see common.lua)
-- ARGV[1] lowest number the next issued ticket may get, 0 .. 2^53; the record
--         keeps the largest of this, its own counter and the highest saved
--         number + 1
-- ARGV[2], ARGV[3], ...  one group of four per ticket: number (0 .. 2^53-1),
--         remaining lifetime in ms, lease ms, liveness ms (lease and liveness
--         0 for a fixed ticket, as read.lua lists them); a ticket with
--         remaining lifetime 0 is already expired and is dropped
--
-- Reply: { now_serving }   number served now, -1 if none
--
-- Keeps: numbers never go down within a record; a conversation with no live
-- ticket and no record stays without keys; every ticket keeps the kind and
-- terms it is saved with (a snapshot from read.lua saved back unchanged
-- changes nothing, the grant included); a kept number keeps its request id;
-- a new head is granted and announced; waiting tickets that are not saved
-- are removed and their waiters told (removed -2 when several were), and a
-- holder whose ticket is not saved learns that it lost the lock.

local key = KEYS[1]
local next_min = integer_arg(ARGV[1], 'next', 0, MAX_TICKET + 1)
if #ARGV % 4 ~= 1 then
  error({ err = 'ERR ticketlock: tickets must come as groups of number, remaining_ms, lease_ms, liveness_ms' })
end
local saved, seen = {}, {}
for i = 2, #ARGV, 4 do
  local t = {
    number = integer_arg(ARGV[i], 'ticket', 0, MAX_TICKET),
    remaining = integer_arg(ARGV[i + 1], 'remaining_ms', 0, MAX_LIFETIME_MS),
    lease = integer_arg(ARGV[i + 2], 'lease_ms', 0, MAX_LIFETIME_MS),
    liveness = integer_arg(ARGV[i + 3], 'liveness_ms', 0, MAX_LIFETIME_MS),
  }
  if (t.lease == 0) ~= (t.liveness == 0) then
    error({ err = 'ERR ticketlock: ticket ' .. int(t.number) .. ' needs both lease_ms and liveness_ms (renewing) or neither (fixed)' })
  end
  if t.remaining > 0 then
    if seen[t.number] then
      error({ err = 'ERR ticketlock: ticket ' .. int(t.number) .. ' is saved twice' })
    end
    seen[t.number] = t
    saved[#saved + 1] = t
  end
end
local now, now_us = clock()
local m = load(key)
if #saved == 0 and not m.exists then return { -1 } end

-- Read every ticket there is before writing anything.
local present = {}
for _, t in ipairs(all_tickets(m)) do present[t.number] = t end

local w = writes()
local made = false
if not m.exists then
  made = not m.present
  m.e, m.n, m.h, m.s, m.f, m.g = now_us, 0, 0, -1, nil, 0
  set(w, 'next', 'v2')
  set(w, 'e', now_us)
  set(w, 's', -1)
  set(w, 'f', 0)
  set(w, 'g', 0)
end

-- Waiting tickets that are not saved are removed; their waiters are told.
local removed, gone_holder = -1, false
for number, t in pairs(present) do
  if not seen[number] then
    w.del[#w.del + 1] = 't' .. int(number)
    if number == m.s then
      gone_holder = true
    elseif t.at >= now then
      if removed == -1 then removed = number else removed = -2 end
    end
  end
end

local n, low, latest = math.max(m.n, next_min), nil, 0
for _, t in ipairs(saved) do
  local old = present[t.number]
  local request = ''
  if old then request = old.request end
  t.at = now + t.remaining
  t.stored = t.at
  t.request = request
  set(w, 't' .. int(t.number), format(t))
  n = math.max(n, t.number + 1)
  if not low or t.number < low then low = t.number end
  latest = math.max(latest, t.at)
end
if not low then low = n end
m.n, m.h = n, low
set(w, 'n', n)
set(w, 'h', low)

-- The grant stays when the head does; a new head is granted now.
local head, ticket = -1, nil
if #saved > 0 then head, ticket = low, seen[low] end
local granted = false
if head ~= -1 and head ~= m.s then
  m.s, m.f, m.g = head, next_fence(m.f, now_us), now
  set(w, 's', head)
  set(w, 'f', m.f)
  set(w, 'g', now)
  granted = true
end
commit(key, w)
if latest > 0 then expire_at(key, latest, made) end
if granted or removed ~= -1 or (gone_holder and head == -1) then
  local left = -1
  if ticket then left = effective(m, ticket).at - now end
  announce(m, head, removed, left)
end
return { head }
