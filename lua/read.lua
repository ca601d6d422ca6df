-- ticketlock read: a read-only snapshot of one conversation's queue.
-- Serves get_lock and is_someone_waiting. (Rust: Backend::read; in memory: State::read.)
--
-- KEYS[1] the conversation's key   (see common.lua)
-- ARGV[1] how many tickets to list, from the head; -1 for all
--
-- Reply: { exists, next, epoch, live, number_1, remaining_ms_1, lease_ms_1, liveness_ms_1, ... }
--   exists        1 if the conversation has a record, else 0 (and nothing follows)
--   next          number the next ticket will get
--   epoch         the record's epoch
--   live          how many live tickets the queue holds; with ARGV[1] = 0 only
--                 whether there is one (0 or 1), which stays cheap on deep queues
--   then up to ARGV[1] live tickets in serving order, each as its number, the
--   ms until it expires, and its terms: lease and liveness in ms for a
--   renewing ticket, 0 and 0 for a fixed one (save.lua takes them back as they
--   are); expired tickets are left out, not removed
--
-- Writes nothing, so it may run on a replica (EVAL_RO / FCALL_RO).

local key = KEYS[1]
local limit = integer_arg(ARGV[1], 'limit', -1, MAX_TICKET)
local now = clock()
local m = load(key)
if not m.exists then return { 0 } end
local reply = { 1, m.n, m.e, 0 }

if limit == 0 then
  local head = scan(m, now, nil, {}, nil)
  if head ~= -1 then reply[4] = 1 end
  return reply
end

local live = {}
for _, t in ipairs(all_tickets(m)) do
  if t.at >= now then live[#live + 1] = t end
end
table.sort(live, function(a, b) return a.number < b.number end)
reply[4] = #live
for i = 1, #live do
  if limit >= 0 and i > limit then break end
  local t = live[i]
  reply[#reply + 1] = t.number
  reply[#reply + 1] = t.at - now
  reply[#reply + 1] = t.lease
  reply[#reply + 1] = t.liveness
end
return reply
