-- ticketlock issue: take the next ticket and learn at once whether it is served.
-- (Rust: Backend::issue; in memory: State::issue.)
--
-- KEYS[1] meta, KEYS[2] queue, KEYS[3] expiry   (see common.lua)
-- ARGV[1] lifetime in ms, integer 1 .. 31536000000: for a fixed ticket, its
--         whole life from now; for a renewing ticket, its lease once granted
-- ARGV[2] liveness in ms for a renewing ticket (what `lock` takes): it expires
--         this long after its owner last polled; "" or absent: a fixed ticket
--
-- Reply: { ticket, epoch, now_serving, head_remaining_ms, fence }
--   ticket             the new ticket's number (0 for a fresh conversation)
--   epoch              the record's epoch; pass it to poll/release to address
--                      exactly this ticket even after the numbering restarts
--   now_serving        the number served now; equals ticket when the caller
--                      holds the lock already (issue and acquire in one trip)
--   head_remaining_ms  ms until the served ticket expires
--   fence              the fencing token when ticket is served, else -1
--
-- Keeps: expired tickets are pruned first, so the new ticket is served only if
-- no live ticket is ahead of it; numbers never repeat within an epoch.

local meta, queue, expiry = KEYS[1], KEYS[2], KEYS[3]
local lifetime = integer_arg(ARGV[1], 'lifetime_ms', 1, MAX_LIFETIME_MS)
local liveness = nil
if ARGV[2] and ARGV[2] ~= '' then liveness = integer_arg(ARGV[2], 'liveness_ms', 1, MAX_LIFETIME_MS) end
check_fields(meta)
local now, now_us = clock()

local before = head(queue)
prune(meta, queue, expiry, now)
if redis.call('HSETNX', meta, 'epoch', now_us) == 1 then
  redis.call('HSET', meta, 'next', 0)
end
local epoch = redis.call('HGET', meta, 'epoch')
local ticket = redis.call('HINCRBY', meta, 'next', 1) - 1
redis.call('ZADD', queue, ticket, ticket)
if liveness then
  redis.call('HSET', meta, 'l' .. ticket, lifetime .. ' ' .. liveness)
  redis.call('ZADD', expiry, now + liveness, ticket)
else
  redis.call('ZADD', expiry, now + lifetime, ticket)
end
local after = settle(meta, queue, expiry, epoch, before, now, now_us, ticket, nil)

local fence = -1
if after == ticket then
  -- The caller is the owner and is here: it picks the grant up at once.
  confirm(meta, expiry, ticket)
  touch(meta, queue, expiry)
  fence = tonumber(redis.call('HGET', meta, 'fence'))
end
return { ticket, tonumber(epoch), after, remaining(expiry, after, now), fence }
