-- ticketlock save: replace one conversation's queue with the given tickets.
-- Serves save_lock. (Rust: Backend::save; in memory: State::save.)
--
-- KEYS[1] meta, KEYS[2] queue, KEYS[3] expiry   (see common.lua)
-- ARGV[1] lowest number the next issued ticket may get; the record keeps the
--         largest of this, its own counter and the highest saved number + 1
-- ARGV[2], ARGV[3], ...  pairs of ticket number and remaining lifetime in ms;
--         a pair with remaining lifetime 0 is already expired and is dropped
--
-- Reply: { now_serving }   number served now, -1 if none
--
-- Keeps: numbers never go down within a record; a conversation with no live
-- ticket and no record stays without keys; saved tickets are fixed ones; the
-- new head is granted and announced.

local meta, queue, expiry = KEYS[1], KEYS[2], KEYS[3]
local next_min = integer_arg(ARGV[1], 'next', 0, 9007199254740991)
if #ARGV % 2 ~= 1 then
  error({ err = 'ERR ticketlock: tickets must come as number, remaining_ms pairs' })
end
local numbers, lifetimes = {}, {}
for i = 2, #ARGV, 2 do
  numbers[#numbers + 1] = integer_arg(ARGV[i], 'ticket', 0, 9007199254740991)
  lifetimes[#lifetimes + 1] = integer_arg(ARGV[i + 1], 'remaining_ms', 0, MAX_LIFETIME_MS)
end
check_types(meta, queue, expiry)
local now, now_us = clock()

local epoch = redis.call('HGET', meta, 'epoch')
local before = head(queue)
remove(meta, queue, expiry, redis.call('ZRANGE', queue, 0, -1))
for i, number in ipairs(numbers) do
  if lifetimes[i] > 0 then
    redis.call('ZADD', queue, number, number)
    redis.call('ZADD', expiry, now + lifetimes[i], number)
    if number + 1 > next_min then next_min = number + 1 end
  end
end
if head(queue) == -1 and not epoch then return { -1 } end

if not epoch then
  epoch = now_us
  redis.call('HSET', meta, 'epoch', epoch, 'next', next_min)
else
  local current = tonumber(redis.call('HGET', meta, 'next')) or 0
  if next_min > current then redis.call('HSET', meta, 'next', next_min) end
end
return { settle(meta, queue, expiry, epoch, before, now, now_us, nil, nil) }
