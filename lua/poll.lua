-- ticketlock poll: where does my ticket stand? Also the waiter's check-in and
-- the owner's pick-up of a grant. (Rust: Backend::poll; in memory: State::poll.)
--
-- KEYS[1] the conversation's key   (see common.lua)
-- ARGV[1] ticket number
-- ARGV[2] epoch the ticket was issued in (from issue), or "" for any epoch
--
-- Reply: { status, now_serving, ahead, head_remaining_ms, own_remaining_ms, fence }
--   status  1 served: the ticket holds the lock (a renewing ticket's lease now
--             runs from its grant)
--           0 waiting (a renewing ticket's life is renewed by `liveness`)
--          -1 gone: the ticket expired, was removed, or belongs to an older
--             record; it will never be served, even if its number comes back
--   now_serving        number served now, -1 if none
--   ahead              when waiting: how many numbers lie from the served
--                      ticket up to this one; tickets among them may have
--                      left already, so it is an upper bound. 0 otherwise
--   head_remaining_ms  ms until the served ticket expires, -1 if none
--   own_remaining_ms   ms until this ticket expires, -1 if gone
--   fence              the fencing token when served, else -1
--
-- Keeps: an expired head is dropped and the next one granted and told, so a
-- crashed holder delays the queue by no more than its lease.

local key = KEYS[1]
local number = integer_arg(ARGV[1], 'ticket', 0, MAX_TICKET)
local field = 't' .. int(number)
local now, now_us = clock()
local m = load(key, { field })
if not m.exists then return { -1, -1, 0, -1, -1, -1 } end

local mine = parse(m, number, m.extra[1])
local w = writes()
local head, ticket, granted
if mine and number == m.s and mine.at >= now then
  -- The served ticket asks: nothing below it is live (all below s are gone).
  head, ticket, granted = number, mine, false
else
  head, ticket, granted = settle(m, w, now, now_us, nil, { [number] = m.extra[1] })
end

local status, own = -1, -1
if (ARGV[2] ~= nil and ARGV[2] ~= '' and tonumber(ARGV[2]) ~= m.e) or not mine or mine.at < now then
  status = -1
elseif head == number then
  status = 1
  own = confirm(m, w, number, mine) - now
else
  status = 0
  if mine.liveness > 0 then
    mine.at = now + mine.liveness
    set(w, field, format(mine))
    w.expiry = mine.at
  end
  own = mine.at - now
end

commit(key, w)
if w.expiry then expire_at(key, w.expiry, false) end
local left = -1
if ticket then left = ticket.at - now end
-- The poller learns from this reply; the others are told of a new grant
-- unless it is the poller's own.
if granted and head ~= number then announce(m, head, -1, left) end
if status == 1 then return { 1, head, 0, own, own, m.f } end
if status == 0 then return { 0, head, number - head, left, own, -1 } end
return { -1, head, 0, left, -1, -1 }
