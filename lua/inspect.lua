-- ticketlock inspect: everything there is to know about one conversation, for
-- operators (`ticketlock inspect`) and other clients. Read-only.
-- (Rust: Backend::inspect; in memory: State::inspect.)
--
-- KEYS[1] the conversation's key   (see common.lua)
-- ARGV[1] how many tickets to list, lowest number first; -1 for all
--
-- Reply: { exists, next, epoch, head, served, fence, granted_ms, ttl_ms, live,
--          expired, cancelled, then per listed ticket:
--          number, remaining_ms, lease_ms, liveness_ms, request }
--   exists      1 if the conversation has a record, else 0 (then every field
--               but ttl_ms and cancelled is -1 and no ticket follows)
--   next        number the next ticket will get
--   epoch       the record's epoch
--   head        the lowest live ticket (the one served, or about to be once a
--               write runs), -1 if none
--   served      the ticket granted last (it may have left since), -1 if none
--   fence       that grant's fencing token, -1 if none
--   granted_ms  ms since that grant while its owner has not picked it up; -1
--               once it has (or if there is no grant)
--   ttl_ms      the key's PTTL: ms until it expires (-2: no key)
--   live        live tickets; expired: tickets whose expiry has passed but
--               that no write has dropped yet
--   cancelled   request ids remembered by cancel.lua whose issue has not run
--   each ticket, live or expired, in number order: its number, ms until it
--   expires (negative: expired that long ago), lease and liveness ms (0 and 0
--   for a fixed ticket), and the request id its issue carried ("" if none)
--
-- Writes nothing (FCALL_RO / EVALSHA_RO), so it also works on a replica and
-- on a Redis that is out of memory. The lease of a grant not yet picked up
-- counts from the grant, as for every other script (see parse in common.lua).

local key = KEYS[1]
local limit = integer_arg(ARGV[1], 'limit', -1, MAX_TICKET)
local now = clock()
-- An operator wants to know what is there instead.
local kind = redis.call('TYPE', key)['ok']
if kind ~= 'none' and kind ~= 'hash' then refuse(key, 'holds a ' .. kind .. ', not a ticketlock record (a hash)') end
local m = load(key)
local ttl = redis.call('PTTL', key)
local cancelled = 0
for _ in string.gmatch(m.x or '', '%S+ %d+') do cancelled = cancelled + 1 end
if not m.exists then return { 0, -1, -1, -1, -1, -1, -1, ttl, -1, -1, cancelled } end

local tickets = all_tickets(m)
table.sort(tickets, function(a, b) return a.number < b.number end)
local live, head = 0, -1
for _, t in ipairs(tickets) do
  if t.at >= now then
    live = live + 1
    if head == -1 then head = t.number end
  end
end
local granted = -1
if m.s ~= -1 and m.g ~= 0 then granted = now - m.g end
local fence = -1
if m.s ~= -1 then fence = m.f end
local reply = { 1, m.n, m.e, head, m.s, fence, granted, ttl, live, #tickets - live, cancelled }
for i, t in ipairs(tickets) do
  if limit >= 0 and i > limit then break end
  reply[#reply + 1] = t.number
  reply[#reply + 1] = t.at - now
  reply[#reply + 1] = t.lease
  reply[#reply + 1] = t.liveness
  reply[#reply + 1] = t.request
end
return reply
