-- A node's heartbeat: it stays a member until its expiry, by the server's clock (the same
-- clock as lease expiry, so nodes on machines whose clocks disagree still agree here).
-- KEYS[1] the members (zset: node id -> expiry ms)
-- ARGV[1] node id   ARGV[2] ttl (ms), or 0 to leave now
-- ARGV[3] now (ms), or '' for the server's clock (tests pass a simulated time)
-- Returns the live members' ids, sorted.
local now
if ARGV[3] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
else
  now = tonumber(ARGV[3])
end
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(members)
return members
