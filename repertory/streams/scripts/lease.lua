-- Acquire or renew a partition lease; taking it over bumps the epoch (fencing token, G4).
-- KEYS[1] the partition lease (hash: owner, expires ms)   KEYS[2] the partition epoch
-- ARGV[1] node id   ARGV[2] lease ttl (ms)
-- ARGV[3] now (ms), or '' for the server's clock: nodes leave expiry to the server, so those
--   whose clocks disagree still agree on it; tests pass a simulated time instead.
-- Returns the epoch the node holds, or {0, owner} when another node holds the lease.
local now
if ARGV[3] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
else
  now = tonumber(ARGV[3])
end
local lease = redis.call('HMGET', KEYS[1], 'owner', 'expires')
local owner = lease[1]
if owner and tonumber(lease[2]) <= now then
  owner = false -- lapsed: free, even for the node that held it
end
if owner and owner ~= ARGV[1] then
  return {0, owner}
end
local expires = string.format('%d', now + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'expires', expires)
if ARGV[3] == '' then
  -- On the server's clock the key also lapses by itself. A given time may be far from the
  -- server's (simulated time starts in 2020): there, only this script judges expiry.
  redis.call('PEXPIREAT', KEYS[1], expires)
end
if not owner then
  return {redis.call('INCR', KEYS[2]), ARGV[1]}
end
return {tonumber(redis.call('GET', KEYS[2]) or '0'), ARGV[1]}
