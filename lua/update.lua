-- ticketlock update: prune expired tickets and hand the lock on if the served one expired.
-- Serves update_lock. (Rust: Backend::update; in memory: State::update.)
--
-- KEYS[1] meta, KEYS[2] queue, KEYS[3] expiry   (see common.lua)
-- (no ARGV)
--
-- Reply: { pruned, now_serving }
--   pruned       how many expired tickets were removed
--   now_serving  number served now, -1 if none
--
-- Keeps: the record (and its counter) stays even when the queue empties, as
-- after finish; only cleanup and delete remove it.

local meta, queue, expiry = KEYS[1], KEYS[2], KEYS[3]
check_fields(meta)
local now, now_us = clock()
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then return { 0, -1 } end
local before = head(queue)
local pruned = prune(meta, queue, expiry, now)
return { pruned, settle(meta, queue, expiry, epoch, before, now, now_us, nil, nil) }
