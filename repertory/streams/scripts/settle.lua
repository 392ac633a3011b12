-- Settle consumed entries of one stream, each exactly once: ack and delete it, then append one
-- message to each of its further streams (a result, a retry, a dead letter). Whoever settles an
-- entry first wins; a worker whose task was taken over and already settled gets 0 for it, and
-- nothing of it is written. Several entries in one call: concurrent tasks share a round trip.
-- KEYS[1] the stream of the entries   KEYS[2..] streams to append to
-- ARGV[1] consumer group, then per entry: its id, its number of appends n, then n times (the
--   index in KEYS of the stream to append to, the message)
-- Returns, per entry, 1 if this call settled it, else 0.
local settled = {}
local i = 2
while i <= #ARGV do
  local entry_id, appends = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  if redis.call('XACK', KEYS[1], ARGV[1], entry_id) == 1 then
    redis.call('XDEL', KEYS[1], entry_id)
    for j = i, i + 2 * appends - 1, 2 do
      redis.call('XADD', KEYS[tonumber(ARGV[j])], '*', 'm', ARGV[j + 1])
    end
    settled[#settled + 1] = 1
  else
    settled[#settled + 1] = 0
  end
  i = i + 2 * appends
end
return settled
