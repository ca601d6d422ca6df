-- ticketlock extend: the holder renews its lease. (Rust: Backend::extend; in memory: State::extend.)
--
-- KEYS[1] the conversation's key   (see common.lua)
-- ARGV[1] ticket number being served
-- ARGV[2] the fencing token of its grant: only the holder knows it, so nobody
--         else can keep a lease alive
-- ARGV[3] new lease in ms from now, integer 1 .. 31536000000
--
-- Reply: { held, remaining_ms }
--   held          1 if the ticket still held the lock and now has the new
--                 lease, 0 if the lease was lost (expired, removed, re-granted)
--   remaining_ms  ms until the lease ends, -1 if lost
--
-- Keeps: an expired lease is never revived; a lost one hands the lock on at
-- once. A lease made shorter is announced to the waiters, who would
-- otherwise sleep until the end they were told before.

local key = KEYS[1]
local number = integer_arg(ARGV[1], 'ticket', 0, MAX_TICKET)
local fence = integer_arg(ARGV[2], 'fence', 0, MAX_TICKET)
local lease = integer_arg(ARGV[3], 'lease_ms', 1, MAX_LIFETIME_MS)
local field = 't' .. int(number)
local now, now_us = clock()
local m = load(key, { field })
if not m.exists then return { 0, -1 } end

local mine = parse(m, number, m.extra[1])
local w = writes()
if mine and number == m.s and m.f == fence and mine.at >= now then
  local before = mine.at
  mine.at = now + lease
  m.g = 0
  set(w, 'g', 0)
  set(w, field, format(mine))
  commit(key, w)
  expire_at(key, mine.at, false)
  if mine.at < before and m.n > number + 1 then announce(m, number, -1, lease) end
  return { 1, lease }
end

-- Lost. If the lease lapsed, the next waiter need not wait for its own check.
local head, ticket, granted = settle(m, w, now, now_us, nil, { [number] = m.extra[1] })
commit(key, w)
if granted then announce(m, head, -1, ticket.at - now) end
return { 0, -1 }
