-- ticketlock update: drop every expired ticket and hand the lock on if the served one expired.
-- Serves update_lock. (Rust: Backend::update; in memory: State::update.)
--
-- KEYS[1] the conversation's key   (see common.lua)
-- (no ARGV)
--
-- Reply: { pruned, now_serving }
--   pruned       how many expired tickets were removed
--   now_serving  number served now, -1 if none
--
-- Keeps: the record (and its counter) stays even when the queue empties, as
-- after finish; only cleanup and delete remove it.

local key = KEYS[1]
local now, now_us = clock()
local m = load(key)
if not m.exists then return { 0, -1 } end

-- Every ticket is read before anything is written.
local w = writes()
local head, ticket = -1, nil
for _, t in ipairs(all_tickets(m)) do
  if t.at < now then
    w.del[#w.del + 1] = t.field
  elseif head == -1 or t.number < head then
    head, ticket = t.number, t
  end
end
local granted = grant(m, w, head, now, now_us)
commit(key, w)
if granted then announce(m, head, -1, effective(m, ticket).at - now) end
return { #w.del, head }
