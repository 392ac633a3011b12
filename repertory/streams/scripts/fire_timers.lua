-- Move due timers of a partition into its inbox, atomically (a timer fires once).
-- KEYS[1] the partition timers (zset: encoded envelope -> due ms)   KEYS[2] the partition inbox
-- ARGV[1] now (ms)   ARGV[2] most timers to fire in this call
-- Returns how many fired.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, message in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'm', message)
  redis.call('ZREM', KEYS[1], message)
end
return #due
