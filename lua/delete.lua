-- ticketlock delete: remove one conversation's record and every ticket in it.
-- Serves delete_lock. (Rust: Backend::delete; in memory: State::delete.)
--
-- KEYS[1] the conversation's key   (see common.lua)
-- (no ARGV)
--
-- Reply: { existed }   1 if there was a record, else 0
--
-- Keeps: waiters and the holder are told (serving -1), so they find out at
-- once that their tickets are gone; the next ticket starts a new record with
-- a new epoch.

local key = KEYS[1]
clock()
local m = load(key)
if not m.present then return { 0 } end
redis.call('DEL', key)
if not m.exists then return { 0 } end
announce(m, -1, -1, -1)
return { 1 }
