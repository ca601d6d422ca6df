-- ticketlock poll: where does my ticket stand? (Rust: Backend::poll; in memory: State::poll.)
--
-- KEYS[1] meta, KEYS[2] queue, KEYS[3] expiry   (see common.lua)
-- ARGV[1] ticket number
-- ARGV[2] epoch the ticket was issued in (from issue), or "" for any epoch
--
-- Reply: { status, now_serving, ahead, head_remaining_ms, own_remaining_ms }
--   status  1 served: the ticket holds the lock
--           0 waiting: `ahead` live tickets are in front of it
--          -1 gone: the ticket expired, was removed, or belongs to an older
--             record; it will never be served, even if its number comes back
--   now_serving        number served now, -1 if none
--   head_remaining_ms  ms until the served ticket expires, -1 if none
--   own_remaining_ms   ms until this ticket expires, -1 if gone
--
-- Keeps: expired tickets are pruned first, and if that moved the head the new
-- head's waiter is told, so a crashed holder delays the queue by no more than
-- its lifetime.

local meta, queue, expiry = KEYS[1], KEYS[2], KEYS[3]
local ticket = integer_arg(ARGV[1], 'ticket', 0, 9007199254740991)
check_types(meta, queue, expiry)
local now = clock()

local epoch = redis.call('HGET', meta, 'epoch')
local before = head(queue)
prune(queue, expiry, now)
local after = head(queue)
if epoch then announce(meta, epoch, before, after, ticket) end

local own = remaining(expiry, ticket, now)
if not epoch or (ARGV[2] ~= '' and tonumber(ARGV[2]) ~= tonumber(epoch)) or own < 0 then
  return { -1, after, 0, remaining(expiry, after, now), -1 }
end
if after == ticket then
  return { 1, after, 0, own, own }
end
return { 0, after, redis.call('ZRANK', queue, ticket), remaining(expiry, after, now), own }
