-- ticketlock release: remove one ticket and hand the lock to the next live one.
-- Serves Rasa's finish_serving and cleanup. (Rust: Backend::release; in memory: State::release.)
--
-- KEYS[1] meta, KEYS[2] queue, KEYS[3] expiry   (see common.lua)
-- ARGV[1] ticket number to remove
-- ARGV[2] "finish"  remove the ticket only
--         "cleanup" remove it, and delete every key of the conversation when no
--                   live ticket is left
-- ARGV[3] epoch the ticket was issued in, or "" for any epoch; a ticket of an
--         older record is left alone, so a late release never removes a ticket
--         that reuses its number after the record was deleted
--
-- Reply: { removed, now_serving }
--   removed      1 if the ticket was live and is gone now; 0 if it was not
--                there, or had already expired (a holder's lease had lapsed)
--   now_serving  number served now, -1 if none
--
-- Keeps: remove the ticket and prune before granting and publishing, or the
-- next waiter would be told a stale head; the announcement names the new head,
-- and the removed ticket when it was a waiting one.

local meta, queue, expiry = KEYS[1], KEYS[2], KEYS[3]
local ticket = integer_arg(ARGV[1], 'ticket', 0, 9007199254740991)
local mode = ARGV[2]
if mode ~= 'finish' and mode ~= 'cleanup' then
  error({ err = 'ERR ticketlock: mode must be "finish" or "cleanup", got ' .. tostring(mode) })
end
check_fields(meta)
local now, now_us = clock()

local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then return { 0, -1 } end
local before = head(queue)
-- Prune before removing: a ticket whose lease already ran out is reported as
-- not removed, so its holder learns it lost the lock.
prune(meta, queue, expiry, now)
local removed = 0
if ARGV[3] == '' or tonumber(ARGV[3]) == tonumber(epoch) then
  removed = redis.call('ZREM', queue, ticket)
  redis.call('ZREM', expiry, ticket)
  redis.call('HDEL', meta, 'l' .. ticket)
end

if head(queue) == -1 and mode == 'cleanup' then
  redis.call('DEL', meta, queue, expiry)
  return { removed, -1 }
end
-- A removed waiter (not the served ticket) is named, or it would only find
-- out at its next check.
local waiter = nil
if removed == 1 and ticket ~= before then waiter = ticket end
return { removed, settle(meta, queue, expiry, epoch, before, now, now_us, nil, waiter) }
