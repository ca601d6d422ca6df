-- ticketlock poll: where does my ticket stand? Also the waiter's heartbeat and
-- the owner's pick-up of a grant. (Rust: Backend::poll; in memory: State::poll.)
--
-- KEYS[1] meta, KEYS[2] queue, KEYS[3] expiry   (see common.lua)
-- ARGV[1] ticket number
-- ARGV[2] epoch the ticket was issued in (from issue), or "" for any epoch
--
-- Reply: { status, now_serving, ahead, head_remaining_ms, own_remaining_ms, fence }
--   status  1 served: the ticket holds the lock (a renewing ticket's lease now
--             runs from its grant)
--           0 waiting: `ahead` live tickets are in front of it (a renewing
--             ticket's life is renewed by `liveness`)
--          -1 gone: the ticket expired, was removed, or belongs to an older
--             record; it will never be served, even if its number comes back
--   now_serving        number served now, -1 if none
--   head_remaining_ms  ms until the served ticket expires, -1 if none
--   own_remaining_ms   ms until this ticket expires, -1 if gone
--   fence              the fencing token when served, else -1
--
-- Keeps: expired tickets are pruned first, and if that moved the head the new
-- head is granted and told, so a crashed holder delays the queue by no more
-- than its lease.

local meta, queue, expiry = KEYS[1], KEYS[2], KEYS[3]
local ticket = integer_arg(ARGV[1], 'ticket', 0, 9007199254740991)
check_fields(meta)
local now, now_us = clock()

local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then return { -1, -1, 0, -1, -1, -1 } end
local before = head(queue)
prune(meta, queue, expiry, now)
local after = settle(meta, queue, expiry, epoch, before, now, now_us, ticket, nil)

if (ARGV[2] ~= '' and tonumber(ARGV[2]) ~= tonumber(epoch)) or remaining(expiry, ticket, now) < 0 then
  return { -1, after, 0, remaining(expiry, after, now), -1, -1 }
end
if after == ticket then
  confirm(meta, expiry, ticket)
  touch(meta, queue, expiry)
  local own = remaining(expiry, ticket, now)
  return { 1, after, 0, own, own, tonumber(redis.call('HGET', meta, 'fence')) }
end
local _, liveness = terms(meta, ticket)
if liveness then
  redis.call('ZADD', expiry, now + liveness, ticket)
  touch(meta, queue, expiry)
end
return { 0, after, redis.call('ZRANK', queue, ticket), remaining(expiry, after, now), remaining(expiry, ticket, now), -1 }
