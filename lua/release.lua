-- ticketlock release: remove one ticket and hand the lock to the next live one.
-- Serves Rasa's finish_serving and cleanup, and a guard's release.
-- (Rust: Backend::release; in memory: State::release.)
--
-- KEYS[1] the conversation's key   (see common.lua)
-- ARGV[1] ticket number to remove
-- ARGV[2] "finish"  remove the ticket only
--         "cleanup" remove it, and delete the record when no live ticket is left
-- ARGV[3] epoch the ticket was issued in, or "" for any epoch; a ticket of an
--         older record is left alone, so a late release never removes a ticket
--         that reuses its number after the record was deleted
-- ARGV[4] "owner" when the caller owns the ticket (it issued it, or holds its
--         grant), or "" / absent (an admin removal: the ticket's waiter, or
--         its holder, is told at once that it is gone)
--
-- Reply: { removed, now_serving }
--   removed      1 if the ticket was live and is gone now; 0 if it was not
--                there, or had already expired (a holder's lease had lapsed)
--   now_serving  number served now, -1 if none
--
-- Keeps: the ticket is removed and the next head found before anything is
-- published, so a wake-up never names a stale head. Releasing the only
-- ticket costs three commands: TIME, HMGET, DEL.

local key = KEYS[1]
local number = integer_arg(ARGV[1], 'ticket', 0, MAX_TICKET)
local mode = ARGV[2]
if mode ~= 'finish' and mode ~= 'cleanup' then
  error({ err = 'ERR ticketlock: mode must be "finish" or "cleanup", got ' .. tostring(mode) })
end
local owner = ARGV[4] == 'owner'
if not owner and ARGV[4] ~= nil and ARGV[4] ~= '' then
  error({ err = 'ERR ticketlock: ARGV[4] must be "owner" or "", got ' .. tostring(ARGV[4]) })
end
-- The next ticket is read at once: it is the next head when the head leaves.
local now, now_us = clock()
local m = load(key, { 't' .. int(number), 't' .. int(number + 1) })
if not m.exists then return { 0, -1 } end
local value = m.extra[1]
if ARGV[3] ~= nil and ARGV[3] ~= '' and tonumber(ARGV[3]) ~= m.e then value = nil end

-- The only ticket leaves (the common case): delete the record.
if value and mode == 'cleanup' and number == m.h and m.n == number + 1 and not m.x then
  local ticket = parse(m, number, value)
  redis.call('DEL', key)
  if number == m.s and not owner then announce(m, -1, -1, -1) end
  if ticket.at >= now then return { 1, -1 } end
  return { 0, -1 }
end

return leave(m, number, value, mode, owner, now, now_us, { [number] = m.extra[1], [number + 1] = m.extra[2] })
