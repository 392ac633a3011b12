-- Heartbeat: reset the idle time of entries the consumer still owns, and only those, so a
-- live worker keeps its claim and never steals back an entry another consumer took over.
-- KEYS[1] the stream   ARGV[1] consumer group   ARGV[2] consumer   ARGV[3..] entry ids
-- Returns how many entries the consumer still owned.
local kept = 0
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #pending > 0 and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
