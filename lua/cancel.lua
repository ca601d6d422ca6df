-- ticketlock cancel: give back the ticket an issue with this request id took,
-- whether that issue ran already or has yet to run. (Rust: Backend::cancel;
-- in memory: State::cancel.)
--
-- A client whose issue timed out or lost its connection cannot know whether
-- the issue ran. It sends this, on the same connection when it can: if the
-- issue ran, its ticket is removed (and the lock handed on if it had been
-- served at once); if not, the request id is remembered for `remember_ms`,
-- and the issue, should it still arrive, takes no ticket and replies -1.
--
-- KEYS[1] the conversation's key   (see common.lua)
-- ARGV[1] the request id the issue carried (1-64 letters, digits, - or _)
-- ARGV[2] how long to remember it, in ms, integer 1 .. 31536000000
--
-- Reply: { found, ticket }
--   found   1: the issue had run; its ticket is gone now
--           0: it had not run (or its ticket was gone already); remembered
--   ticket  the ticket removed, -1 if none

local key = KEYS[1]
local request = request_arg(ARGV[1])
if request == '' then
  error({ err = 'ERR ticketlock: cancel needs a request id' })
end
local remember = integer_arg(ARGV[2], 'remember_ms', 1, MAX_LIFETIME_MS)
local now, now_us = clock()
local m = load(key)

for _, t in ipairs(all_tickets(m)) do
  if t.request == request then
    leave(m, t.number, t.value, 'cleanup', true, now, now_us, nil)
    return { 1, t.number }
  end
end

local x = forget_request(m.x, request, now)
if x ~= '' then x = x .. ' ' end
redis.call('HSET', key, 'next', 'v2', 'x', x .. request .. ' ' .. int(now + remember))
expire_at(key, now + remember, not m.present)
return { 0, -1 }
