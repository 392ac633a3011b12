-- Commit the outcome of handling a batch of messages of one actor, atomically (G2 and G4).
-- KEYS[1] the actor's event stream        KEYS[2] the actor's handled-message stream
-- KEYS[3] the partition inbox             KEYS[4] the partition seen-set (zset: id -> time)
-- KEYS[5] the partition epoch             KEYS[6] the partition outbox
-- KEYS[7] the partition timers (zset: encoded envelope -> due ms)
-- ARGV[1] consumer group      ARGV[2] epoch the committer holds ('' = unfenced)
-- ARGV[3] expected version    ARGV[4] now (ms)
-- ARGV[5] seen window (ms)    ARGV[6] seen-set size limit     ARGV[7] number of messages
-- then per message, in handling order:
--   inbox entry id ('' when not from the inbox), dedupe id, the handled message as received,
--   why it was rejected ('' = accepted), when it was handled (ms, the handler's clock),
--   n_events, events...; n_local, messages for this
--   partition's inbox...; n_timers, (due ms, message for this partition)...; n_out, (due ms or
--   0, target key, message for another partition)... (the outbox relay forwards those after
--   the commit: to the target inbox when due is 0, else to the target timer set)
-- Returns {1, version} committed, {0, version} version conflict, {-1, i} message i (1-based)
-- was handled before (nothing written; a batch of one is acked), {-2, epoch} fenced (the
-- committer lost the partition; nothing written).
local function ack(entry_ids)
  if #entry_ids > 0 then
    redis.call('XACK', KEYS[3], ARGV[1], unpack(entry_ids))
    redis.call('XDEL', KEYS[3], unpack(entry_ids))
  end
end

if ARGV[2] ~= '' then
  local epoch = redis.call('GET', KEYS[5])
  if epoch ~= ARGV[2] then
    return {-2, epoch or ''}
  end
end

-- Where each message's arguments start, and the dedupe check, before anything is written.
local count = tonumber(ARGV[7])
local starts = {}
local in_batch = {}
local i = 8
for m = 1, count do
  starts[m] = i
  if in_batch[ARGV[i + 1]] or redis.call('ZSCORE', KEYS[4], ARGV[i + 1]) then
    if count == 1 then
      local entry_ids = {}
      if ARGV[i] ~= '' then entry_ids[1] = ARGV[i] end
      ack(entry_ids)
    end
    return {-1, m}
  end
  in_batch[ARGV[i + 1]] = true
  i = i + 5
  i = i + tonumber(ARGV[i]) + 1
  i = i + tonumber(ARGV[i]) + 1
  i = i + 2 * tonumber(ARGV[i]) + 1
  i = i + 3 * tonumber(ARGV[i]) + 1
end

local version = redis.call('XLEN', KEYS[1])
if version ~= tonumber(ARGV[3]) then
  return {0, version}
end

local now = tonumber(ARGV[4])
local entry_ids = {}
for m = 1, count do
  i = starts[m]
  local entry_id, dedupe_id, handled, rejected = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local handled_at = ARGV[i + 4]
  local before = version
  i = i + 5
  local n = tonumber(ARGV[i])
  for j = 1, n do
    version = version + 1
    redis.call('XADD', KEYS[1], version .. '-0', 'e', ARGV[i + j])
  end
  i = i + n + 1
  redis.call('XADD', KEYS[2], '*', 'm', handled, 'at', handled_at, 'from', before, 'to', version,
    'rejected', rejected)
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
  redis.call('ZADD', KEYS[4], now, dedupe_id)
  if entry_id ~= '' then entry_ids[#entry_ids + 1] = entry_id end
end

redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[5]))
local excess = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[6])
if excess > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, excess - 1)
end
ack(entry_ids)
return {1, version}
