-- ticketlock read: a read-only snapshot of one conversation's queue.
-- Serves get_lock and is_someone_waiting. (Rust: Backend::read; in memory: State::read.)
--
-- KEYS[1] meta, KEYS[2] queue, KEYS[3] expiry   (see common.lua)
-- ARGV[1] how many tickets to list, from the head; -1 for all
--
-- Reply: { exists, next, epoch, live, number_1, remaining_ms_1, number_2, remaining_ms_2, ... }
--   exists        1 if the conversation has a record, else 0 (and nothing follows)
--   next          number the next ticket will get
--   epoch         the record's epoch
--   live          how many live tickets the queue holds
--   then up to ARGV[1] live tickets in serving order, each as its number and
--   the ms until it expires; expired tickets are left out, not removed
--
-- Writes nothing, so it may run on a replica (EVAL_RO / FCALL_RO).

local meta, queue, expiry = KEYS[1], KEYS[2], KEYS[3]
local limit = integer_arg(ARGV[1], 'limit', -1, 9007199254740991)
check_fields(meta)
local now = clock()

local fields = redis.call('HMGET', meta, 'next', 'epoch')
if not fields[2] then return { 0 } end
local live = redis.call('ZCOUNT', expiry, now, '+inf')
local reply = { 1, tonumber(fields[1]), tonumber(fields[2]), live }
if limit == 0 or live == 0 then return reply end

local listed, start, batch = 0, 0, 256
while limit < 0 or listed < limit do
  local numbers = redis.call('ZRANGE', queue, start, start + batch - 1)
  if #numbers == 0 then break end
  for _, number in ipairs(numbers) do
    if not tonumber(number) then
      error({ err = 'WRONGTYPE ticketlock: key ' .. queue .. ' holds a member that is not a ticket number' })
    end
    local left = remaining(expiry, number, now)
    if left >= 0 then
      reply[#reply + 1] = tonumber(number)
      reply[#reply + 1] = left
      listed = listed + 1
      if listed == limit then break end
    end
  end
  start = start + batch
end
return reply
