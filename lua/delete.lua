-- ticketlock delete: remove one conversation's record and every ticket in it.
-- Serves delete_lock. (Rust: Backend::delete; in memory: State::delete.)
--
-- KEYS[1] meta, KEYS[2] queue, KEYS[3] expiry   (see common.lua)
-- (no ARGV)
--
-- Reply: { existed }   1 if there was a record, else 0
--
-- Keeps: waiters are told (serving -1) so they find out at once that their
-- tickets are gone; the next ticket starts a new record with a new epoch.

local meta, queue, expiry = KEYS[1], KEYS[2], KEYS[3]
check_types(meta, queue, expiry)
local epoch = redis.call('HGET', meta, 'epoch')
redis.call('DEL', meta, queue, expiry)
if not epoch then return { 0 } end
redis.call(PUBLISH, meta, epoch .. ' -1 -1 -1 -1')
return { 1 }
