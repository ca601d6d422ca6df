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
--   KEYS[1] meta   HASH  <prefix>{<id>}
--            next       number the next ticket gets (0, 1, 2 ...)
--            epoch      Redis time (us) the record was created
--            served     the ticket granted last (the head when it was granted)
--            served_at  when it was granted (ms, Redis TIME)
--            fence      that grant's fencing token: max(previous + 1, Redis time
--                       in us), so tokens grow over every grant, even across a
--                       deleted or expired record (while Redis's clock does)
--            held       equals served once its owner picked the grant up
--            l<n>       "<lease ms> <liveness ms>" for renewing ticket n
--   KEYS[2] queue  ZSET  <prefix>{<id>}:q  member = ticket number, score = ticket number
--   KEYS[3] expiry ZSET  <prefix>{<id>}:e  member = ticket number, score = expiry (ms, Redis TIME)
--
-- Two kinds of ticket:
--   fixed     (issue without liveness; Rasa's issue_ticket) expires `lifetime`
--             after it was issued, waiting included;
--   renewing  (issue with liveness; what `lock` takes) expires `liveness` after
--             its waiter last polled, so a live waiter waits as long as it
--             likes and a dead one stops blocking the queue within `liveness`.
--             When granted, its owner must pick the grant up (a poll, or the
--             owner's own issue) before the ticket's waiting expiry, and from
--             then its lease runs
--             `lease` ms counted from the grant; the owner may extend it.
--             A wake-up naming the owner's ticket is enough to start work, but
--             the owner must still poll before its waiting ticket would have
--             expired, or the grant lapses.
--
-- The acquire loop every client runs (the Rust crate, scripts/ticketlock.py):
--   1. issue (with liveness); if now_serving == ticket, it holds the lock;
--   2. SUBSCRIBE to the channel and wait for the confirmation, then poll (so
--      a hand-over is either in the poll's answer or pushed afterwards);
--   3. until served or gone: wait for a wake-up, the served ticket's expiry
--      (head_remaining_ms / serving_ms), or the next check-in (at most a
--      third of liveness, and half the ticket's own remaining life), then
--      poll; a wake-up naming our ticket and epoch means served (pick the
--      grant up with a poll soon), one naming a lower ticket means keep
--      waiting, anything else means poll now;
--   4. release with mode "cleanup" and the epoch.
--
-- Wake-ups are PUBLISHed (SPUBLISHed on Redis Cluster: see PUBLISH below) on
-- the channel named like the meta key, as
-- "<epoch> <serving> <fence> <removed> <serving_ms>" (integers, -1 for none):
-- the ticket granted now with its fencing token, a waiting ticket someone
-- removed (so its waiter learns at once that it is gone), and the ms until
-- the served ticket expires (so the waiters behind it can check then, should
-- its owner be dead).
--
-- Invariants every script keeps:
--   * the ticket served is the lowest live number (strict FIFO);
--   * a ticket is live while Redis time <= its expiry; expired tickets are
--     pruned before anything is decided, so they are never served;
--   * numbers only go up within a record (epoch); a new record gets a new epoch;
--   * fencing tokens only go up, one per grant;
--   * every key expires at the latest ticket expiry plus MARGIN_MS.

local MARGIN_MS = 1000
-- The command wake-ups go out with. For Redis Cluster the crate replaces
-- 'PUBLISH' by 'SPUBLISH' on this one line (sharded pub/sub: a wake-up stays
-- on the conversation's own shard); nothing else differs.
local PUBLISH = 'PUBLISH'
local MAX_LIFETIME_MS = 31536000000 -- 365 days

local function clock()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end

-- Refuse foreign data before the first write: Redis does not roll a script
-- back when a later command fails. Every script reads the meta hash here and
-- reads the queue (head) and the expiry set (prune) before it writes, so a key
-- of the wrong type fails on that read (WRONGTYPE) while nothing has changed;
-- the meta fields must hold numbers.
local function check_fields(meta)
  local fields = { 'next', 'epoch', 'served', 'served_at', 'fence', 'held' }
  local values = redis.call('HMGET', meta, unpack(fields))
  for i, name in ipairs(fields) do
    if values[i] and not tonumber(values[i]) then
      error({ err = 'WRONGTYPE ticketlock: field ' .. name .. ' of key ' .. meta .. ' holds a non-number' })
    end
  end
end

-- The full check, for the scripts that write a key before reading it (save, delete).
local function check_types(meta, queue, expiry)
  local wanted = { [meta] = 'hash', [queue] = 'zset', [expiry] = 'zset' }
  for key, want in pairs(wanted) do
    local got = redis.call('TYPE', key)['ok']
    if got ~= 'none' and got ~= want then
      error({ err = 'WRONGTYPE ticketlock: key ' .. key .. ' holds a ' .. got .. ', expected a ' .. want })
    end
  end
  check_fields(meta)
end

local function integer_arg(value, name, min, max)
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or n < min or n > max then
    error({ err = 'ERR ticketlock: ' .. name .. ' must be an integer in ' .. min .. '..' .. max .. ', got ' .. tostring(value) })
  end
  return n
end

local function head(queue)
  local first = redis.call('ZRANGE', queue, 0, 0)[1]
  if not first then return -1 end
  local number = tonumber(first)
  if not number then
    error({ err = 'WRONGTYPE ticketlock: key ' .. queue .. ' holds a member that is not a ticket number' })
  end
  return number
end

-- ms until the ticket expires, or -1 when it is not live.
local function remaining(expiry, number, now)
  local at = redis.call('ZSCORE', expiry, number)
  if not at then return -1 end
  at = tonumber(at)
  if at < now then return -1 end
  return at - now
end

local function remove(meta, queue, expiry, numbers)
  -- unpack() is bounded by Lua's C stack, so remove in slices.
  for i = 1, #numbers, 1000 do
    local slice = { unpack(numbers, i, math.min(i + 999, #numbers)) }
    redis.call('ZREM', queue, unpack(slice))
    redis.call('ZREM', expiry, unpack(slice))
    for j = 1, #slice do slice[j] = 'l' .. slice[j] end
    redis.call('HDEL', meta, unpack(slice))
  end
end

-- Drop every expired ticket; O(log n + expired).
local function prune(meta, queue, expiry, now)
  local dead = redis.call('ZRANGEBYSCORE', expiry, '-inf', '(' .. now)
  remove(meta, queue, expiry, dead)
  return #dead
end

-- "<lease ms> <liveness ms>" of a renewing ticket, or nil for a fixed one.
local function terms(meta, number)
  local t = redis.call('HGET', meta, 'l' .. number)
  if not t then return nil end
  local lease, liveness = string.match(t, '^(%d+) (%d+)$')
  return tonumber(lease), tonumber(liveness)
end

-- The head becomes the holder: a new fencing token. A renewing head keeps
-- the expiry its last check-in gave it: a live owner (checking in every third
-- of `liveness`) has time to pick the grant up, and a dead one stops blocking
-- the queue `liveness` after its last check-in, not after the grant.
local function grant(meta, h, now, now_us)
  if h == -1 or tonumber(redis.call('HGET', meta, 'served')) == h then return end
  local fence = tonumber(redis.call('HGET', meta, 'fence')) or 0
  if now_us > fence then fence = now_us else fence = fence + 1 end
  redis.call('HSET', meta, 'served', h, 'served_at', now, 'fence', fence)
  redis.call('HDEL', meta, 'held')
end

-- The owner of the served ticket has it: the lease runs from the grant.
local function confirm(meta, expiry, ticket)
  if tonumber(redis.call('HGET', meta, 'held')) == ticket then return end
  local lease = terms(meta, ticket)
  if lease then
    redis.call('ZADD', expiry, tonumber(redis.call('HGET', meta, 'served_at')) + lease, ticket)
  end
  redis.call('HSET', meta, 'held', ticket)
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
local function announce(meta, expiry, epoch, before, after, now, quiet, removed)
  if removed or (after ~= before and after ~= quiet) then
    local fence = -1
    if after ~= -1 then fence = redis.call('HGET', meta, 'fence') end
    local left = remaining(expiry, after, now)
    redis.call(PUBLISH, meta, epoch .. ' ' .. after .. ' ' .. fence .. ' ' .. (removed or -1) .. ' ' .. left)
  end
end

-- The end of every change: grant the head, bound the keys' lives, tell the
-- waiters. Grant before touch (a grant moves an expiry) and before announce
-- (the announcement carries the grant's token). Returns the head.
local function settle(meta, queue, expiry, epoch, before, now, now_us, quiet, removed)
  local after = head(queue)
  grant(meta, after, now, now_us)
  touch(meta, queue, expiry)
  announce(meta, expiry, epoch, before, after, now, quiet, removed)
  return after
end
