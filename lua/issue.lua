-- ticketlock issue: take the next ticket and learn at once whether it is served.
-- (Rust: Backend::issue; in memory: State::issue.)
--
-- KEYS[1] the conversation's key   (see common.lua)
-- ARGV[1] lifetime in ms, integer 1 .. 31536000000: for a fixed ticket, its
--         whole life from now; for a renewing ticket, its lease once granted
-- ARGV[2] liveness in ms for a renewing ticket (what `lock` takes): it expires
--         this long after its owner last polled; "" or absent: a fixed ticket
-- ARGV[3] request id chosen by the caller (1-64 letters, digits, - or _), or
--         "" / absent: lets cancel.lua give the ticket back when the caller
--         never learnt this reply (timeout, lost connection)
--
-- Reply: { ticket, epoch, now_serving, head_remaining_ms, fence }
--   ticket             the new ticket's number (0 for a fresh conversation),
--                      or -1 when cancel.lua ran first for this request id:
--                      then nothing was issued and every other field is -1
--   epoch              the record's epoch; pass it to poll/release to address
--                      exactly this ticket even after the numbering restarts
--   now_serving        the number served now; equals ticket when the caller
--                      holds the lock already (issue and acquire in one trip)
--   head_remaining_ms  ms until the served ticket expires (when the caller
--                      is served: its whole lease)
--   fence              the fencing token when ticket is served, else -1
--
-- Keeps: the new ticket is served only if no live ticket is ahead of it;
-- numbers never repeat within an epoch and never pass MAX_TICKET. An empty
-- conversation (no key) costs four commands: TIME, HMGET, HSET, PEXPIREAT.

local key = KEYS[1]
local lifetime = integer_arg(ARGV[1], 'lifetime_ms', 1, MAX_LIFETIME_MS)
local liveness = 0
if ARGV[2] and ARGV[2] ~= '' then liveness = integer_arg(ARGV[2], 'liveness_ms', 1, MAX_LIFETIME_MS) end
local request = request_arg(ARGV[3])
local now, now_us = clock()

-- Served at once, the caller picks its own grant up: the lease runs from now.
local held = { at = now + lifetime, lease = 0, liveness = 0, request = request }
if liveness > 0 then held.lease, held.liveness = lifetime, liveness end

-- A new record holding only the caller's ticket, served; `made` when the
-- key did not exist.
local function create(fence, made)
  -- Strings, not numbers: Redis would format each number as a double.
  redis.call('HSET', key, 'next', 'v2', 'n', '1', 'e', int(now_us), 'h', '0', 's', '0', 'f', int(fence), 'g', '0', 't0', format(held))
  expire_at(key, held.at, made)
  return { 0, now_us, 0, lifetime, fence }
end

-- No ticketlock data at all (the common case): nothing more to read. The
-- marker alone is asked for (HMGET, which the documented ACL allows; a key
-- of another type fails here with WRONGTYPE).
if not redis.call('HMGET', key, 'next')[1] then return create(now_us, true) end

local m = load(key)
if request ~= '' and m.x then
  local x, found = forget_request(m.x, request, now)
  if found then
    if x == '' then redis.call('HDEL', key, 'x') else redis.call('HSET', key, 'x', x) end
    return { -1, -1, -1, -1, -1 }
  end
end
-- A key made only by cancel.lua (requests cancelled before their issue ran,
-- none of them this one): the record is made beside them.
if not m.exists then return create(next_fence(m.f, now_us), false) end

local number = m.n
if number > MAX_TICKET then
  error({ err = 'ERR ticketlock: conversation ' .. key .. ' has issued every ticket number up to ' .. int(MAX_TICKET) .. '; delete it to start again' })
end
local w = writes()
local head, ahead, granted = settle(m, w, now, now_us, nil, nil)
m.n = number + 1
set(w, 'n', m.n)

if head == -1 then
  grant(m, w, number, now, now_us)
  m.g = 0
  set(w, 'g', 0)
  set(w, 't' .. int(number), format(held))
  commit(key, w)
  expire_at(key, held.at, false)
  return { number, m.e, number, lifetime, m.f }
end

local waiting = { at = now + lifetime, lease = 0, liveness = 0, request = request }
if liveness > 0 then waiting = { at = now + liveness, lease = lifetime, liveness = liveness, request = request } end
set(w, 't' .. int(number), format(waiting))
commit(key, w)
expire_at(key, waiting.at, false)
-- The head changed (the one served before expired): its waiter does not know yet.
if granted then announce(m, head, -1, ahead.at - now) end
return { number, m.e, head, ahead.at - now, -1 }
