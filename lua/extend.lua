-- ticketlock extend: the holder renews its lease. (Rust: Backend::extend; in memory: State::extend.)
--
-- KEYS[1] meta, KEYS[2] queue, KEYS[3] expiry   (see common.lua)
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
-- Keeps: an expired lease is never revived: expired tickets are pruned (and
-- the next one granted) before the owner check.

local meta, queue, expiry = KEYS[1], KEYS[2], KEYS[3]
local ticket = integer_arg(ARGV[1], 'ticket', 0, 9007199254740991)
local fence = integer_arg(ARGV[2], 'fence', 0, 9007199254740991)
local lease = integer_arg(ARGV[3], 'lease_ms', 1, MAX_LIFETIME_MS)
check_fields(meta)
local now, now_us = clock()

local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then return { 0, -1 } end
local before = head(queue)
prune(meta, queue, expiry, now)
local after = settle(meta, queue, expiry, epoch, before, now, now_us, nil, nil)
if after ~= ticket or tonumber(redis.call('HGET', meta, 'fence')) ~= fence then
  return { 0, -1 }
end
redis.call('ZADD', expiry, now + lease, ticket)
redis.call('HSET', meta, 'held', ticket)
touch(meta, queue, expiry)
return { 1, lease }
