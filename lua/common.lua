-- ticketlock: helpers shared by every operation script.
--
-- An operation is sent to Redis as this file followed by the operation's own
-- file (the crate, `ticketlock scripts show` and scripts/ticketlock.py all
-- concatenate them the same way), so every rule below exists exactly once.
--
-- Data model of one conversation; all keys share one hash slot through the
-- hash tag `{<id>}`, where `<id>` is the conversation id with `%`, `{` and `}`
-- percent-encoded (`%25`, `%7B`, `%7D`) and `<prefix>` is `lock:` or
-- `<custom>:lock:`:
--   KEYS[1] meta   HASH  <prefix>{<id>}    next  = next ticket number (0, 1, 2 ...)
--                                          epoch = Redis time (µs) the record was created
--   KEYS[2] queue  ZSET  <prefix>{<id>}:q  member = ticket number, score = ticket number
--   KEYS[3] expiry ZSET  <prefix>{<id>}:e  member = ticket number, score = expiry (ms, Redis TIME)
-- Wake-ups are PUBLISHed on the channel named like the meta key, as
-- "<epoch> <serving>" or "<epoch> <serving> <removed>": the ticket now served
-- (-1 when the queue emptied or the record was deleted) and, when a ticket
-- other than the served one was removed, its number, so its waiter learns at
-- once that it is gone.
--
-- Invariants every script keeps:
--   * the ticket served is the lowest live number (strict FIFO);
--   * a ticket is live while Redis time <= its expiry; expired tickets are
--     pruned before anything is decided, so they are never served;
--   * numbers only go up within a record (epoch); a new record gets a new epoch;
--   * every key expires at the latest ticket expiry plus MARGIN_MS.

local MARGIN_MS = 1000
local MAX_LIFETIME_MS = 31536000000 -- 365 days

local function clock()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end

-- Check types before the first write: Redis does not roll a script back when a
-- later command fails, so a wrong-typed key must stop us while nothing changed.
local function check_types(meta, queue, expiry)
  local wanted = { [meta] = 'hash', [queue] = 'zset', [expiry] = 'zset' }
  for key, want in pairs(wanted) do
    local got = redis.call('TYPE', key)['ok']
    if got ~= 'none' and got ~= want then
      error({ err = 'WRONGTYPE ticketlock: key ' .. key .. ' holds a ' .. got .. ', expected a ' .. want })
    end
  end
end

local function integer_arg(value, name, min, max)
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or n < min or n > max then
    error({ err = 'ERR ticketlock: ' .. name .. ' must be an integer in ' .. min .. '..' .. max .. ', got ' .. tostring(value) })
  end
  return n
end

local function head(queue)
  local first = redis.call('ZRANGE', queue, 0, 0)
  if first[1] then return tonumber(first[1]) end
  return -1
end

-- ms until the ticket expires, or -1 when it is not live.
local function remaining(expiry, number, now)
  local at = redis.call('ZSCORE', expiry, number)
  if not at then return -1 end
  at = tonumber(at)
  if at < now then return -1 end
  return at - now
end

local function remove(queue, expiry, numbers)
  -- unpack() is bounded by Lua's C stack, so remove in slices.
  for i = 1, #numbers, 1000 do
    local slice = { unpack(numbers, i, math.min(i + 999, #numbers)) }
    redis.call('ZREM', queue, unpack(slice))
    redis.call('ZREM', expiry, unpack(slice))
  end
end

-- Drop every expired ticket; O(log n + expired).
local function prune(queue, expiry, now)
  local dead = redis.call('ZRANGEBYSCORE', expiry, '-inf', '(' .. now)
  remove(queue, expiry, dead)
  return #dead
end

-- Bound every key's life by the latest live expiry: a crashed worker leaves
-- nothing behind. With no ticket left the meta key keeps its current TTL, which
-- already ends at most MARGIN_MS after the last ticket's expiry.
local function touch(meta, queue, expiry)
  local last = redis.call('ZRANGE', expiry, -1, -1, 'WITHSCORES')
  if last[2] then
    local at = tonumber(last[2]) + MARGIN_MS
    redis.call('PEXPIREAT', meta, at)
    redis.call('PEXPIREAT', queue, at)
    redis.call('PEXPIREAT', expiry, at)
  end
end

-- Tell the waiters who is served now, so the new head's waiter need not ask.
-- `quiet` is the ticket whose caller learns the head from this reply anyway;
-- `removed` a waiting ticket taken out by someone, whose waiter must be told.
local function announce(meta, epoch, before, after, quiet, removed)
  if removed then
    redis.call('PUBLISH', meta, epoch .. ' ' .. after .. ' ' .. removed)
  elseif after ~= before and after ~= quiet then
    redis.call('PUBLISH', meta, epoch .. ' ' .. after)
  end
end
