-- Acquire or renew a partition lease; taking it over bumps the epoch (fencing token, G4).
-- KEYS[1] the partition lease   KEYS[2] the partition epoch
-- ARGV[1] node id   ARGV[2] lease ttl (ms)
-- Returns the epoch the node holds, or {0, owner} when another node holds the lease.
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  return {0, owner}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if not owner then
  return {redis.call('INCR', KEYS[2]), ARGV[1]}
end
return {tonumber(redis.call('GET', KEYS[2]) or '0'), ARGV[1]}
