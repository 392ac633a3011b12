-- Commit the outcome of handling one message, atomically (guarantees G2 and G4).
-- KEYS[1] the actor's event stream        KEYS[2] the actor's handled-message stream
-- KEYS[3] the partition inbox             KEYS[4] the partition seen-set (zset: id -> time)
-- KEYS[5] the partition epoch             KEYS[6] the partition outbox
-- KEYS[7] the partition timers (zset: encoded envelope -> due ms)
-- ARGV[1] consumer group      ARGV[2] inbox entry id ('' when not from the inbox)
-- ARGV[3] dedupe id           ARGV[4] epoch the committer holds ('' = unfenced)
-- ARGV[5] expected version    ARGV[6] now (ms)
-- ARGV[7] seen window (ms)    ARGV[8] seen-set size limit
-- ARGV[9] the handled message, as received   ARGV[10] why it was rejected ('' = accepted)
-- then: n_events, events...; n_local, messages for this partition's inbox...;
--       n_timers, (due ms, message for this partition)...; n_out, (due ms or 0, target key,
--       message for another partition)... (the outbox relay forwards those after the commit:
--       to the target inbox when due is 0, else to the target timer set)
-- Returns {1, version} committed, {0, version} version conflict, {-1, 0} duplicate (acked,
-- nothing written), {-2, epoch} fenced (the committer lost the partition; nothing written).
local function ack()
  if ARGV[2] ~= '' then
    redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
    redis.call('XDEL', KEYS[3], ARGV[2])
  end
end

if ARGV[4] ~= '' then
  local epoch = redis.call('GET', KEYS[5])
  if epoch ~= ARGV[4] then
    return {-2, epoch or ''}
  end
end

if redis.call('ZSCORE', KEYS[4], ARGV[3]) then
  ack()
  return {-1, 0}
end

local version = redis.call('XLEN', KEYS[1])
if version ~= tonumber(ARGV[5]) then
  return {0, version}
end

local now = tonumber(ARGV[6])
local before = version
local i = 11
local n = tonumber(ARGV[i])
for j = 1, n do
  version = version + 1
  redis.call('XADD', KEYS[1], version .. '-0', 'e', ARGV[i + j])
end
i = i + n + 1
redis.call('XADD', KEYS[2], '*', 'm', ARGV[9], 'at', ARGV[6], 'from', before, 'to', version,
  'rejected', ARGV[10])

n = tonumber(ARGV[i])
for j = 1, n do
  redis.call('XADD', KEYS[3], '*', 'm', ARGV[i + j])
end
i = i + n + 1
n = tonumber(ARGV[i])
for j = 1, n do
  redis.call('ZADD', KEYS[7], ARGV[i + 2 * j - 1], ARGV[i + 2 * j])
end
i = i + 2 * n + 1
n = tonumber(ARGV[i])
for j = 1, n do
  local at = i + 3 * j - 2
  redis.call('XADD', KEYS[6], '*', 'due', ARGV[at], 'to', ARGV[at + 1], 'm', ARGV[at + 2])
end

redis.call('ZADD', KEYS[4], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[7]))
local excess = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[8])
if excess > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, excess - 1)
end
ack()
return {1, version}
