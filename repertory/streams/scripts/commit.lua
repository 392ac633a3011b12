-- Commit the outcome of handling messages of one or more actors of one partition, atomically:
-- everything or nothing (G2 and G4).
-- KEYS[1] the partition inbox             KEYS[2] the partition seen-set (zset: id -> time)
-- KEYS[3] the partition epoch             KEYS[4] the partition outbox
-- KEYS[5] the partition timers (zset: encoded envelope -> due ms)
-- then per actor: KEYS[4 + 2a] its event stream, KEYS[5 + 2a] its handled-message stream
-- ARGV[1] consumer group      ARGV[2] epoch the committer holds ('' = unfenced)
-- ARGV[3] now (ms)            ARGV[4] seen window (ms)     ARGV[5] seen-set size limit
-- ARGV[6] number of actors
-- then per actor: its expected version, its number of messages, then per message, in
--   handling order: inbox entry id ('' when not from the inbox), dedupe id, the handled
--   message as received, why it was rejected ('' = accepted), when it was handled (ms, the
--   handler's clock), n_events, events...; n_local, messages for this partition's inbox...;
--   n_timers, (due ms, message for this partition)...; n_out, (due ms or 0, target key,
--   message for another partition)... (the outbox relay forwards those after the commit: to
--   the target inbox when due is 0, else to the target timer set)
-- Returns {1, version...} committed (each actor's version after it), {0, a, version} actor a
-- (1-based) has another version, {-1, a, i} message i (1-based) of actor a was handled
-- before, {-2, epoch} fenced (the committer lost the partition). Only a commit returns 1;
-- else nothing is written, except that a lone message handled before is acked.
local function ack(entry_ids)
  if #entry_ids > 0 then
    redis.call('XACK', KEYS[1], ARGV[1], unpack(entry_ids))
    redis.call('XDEL', KEYS[1], unpack(entry_ids))
  end
end

if ARGV[2] ~= '' then
  local epoch = redis.call('GET', KEYS[3])
  if epoch ~= ARGV[2] then
    return {-2, epoch or ''}
  end
end

-- Where each message's arguments start; the version and dedupe checks, before any write.
local actors = tonumber(ARGV[6])
local starts = {}
local counts = {}
local in_batch = {}
local i = 7
for a = 1, actors do
  local expected = tonumber(ARGV[i])
  counts[a] = tonumber(ARGV[i + 1])
  i = i + 2
  starts[a] = i
  for m = 1, counts[a] do
    if in_batch[ARGV[i + 1]] or redis.call('ZSCORE', KEYS[2], ARGV[i + 1]) then
      if actors == 1 and counts[a] == 1 and ARGV[i] ~= '' then
        ack({ARGV[i]})
      end
      return {-1, a, m}
    end
    in_batch[ARGV[i + 1]] = true
    i = i + 5
    i = i + tonumber(ARGV[i]) + 1
    i = i + tonumber(ARGV[i]) + 1
    i = i + 2 * tonumber(ARGV[i]) + 1
    i = i + 3 * tonumber(ARGV[i]) + 1
  end
  local version = redis.call('XLEN', KEYS[4 + 2 * a])
  if version ~= expected then
    return {0, a, version}
  end
end

local now = tonumber(ARGV[3])
local entry_ids = {}
local versions = {1}
for a = 1, actors do
  local events_key, handled_key = KEYS[4 + 2 * a], KEYS[5 + 2 * a]
  local version = tonumber(ARGV[starts[a] - 2])
  i = starts[a]
  for _ = 1, counts[a] do
    local entry_id, dedupe_id, handled, rejected = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local handled_at = ARGV[i + 4]
    local before = version
    i = i + 5
    local n = tonumber(ARGV[i])
    for j = 1, n do
      version = version + 1
      redis.call('XADD', events_key, version .. '-0', 'e', ARGV[i + j])
    end
    i = i + n + 1
    redis.call('XADD', handled_key, '*', 'm', handled, 'at', handled_at, 'from', before,
      'to', version, 'rejected', rejected)
    n = tonumber(ARGV[i])
    for j = 1, n do
      redis.call('XADD', KEYS[1], '*', 'm', ARGV[i + j])
    end
    i = i + n + 1
    n = tonumber(ARGV[i])
    for j = 1, n do
      redis.call('ZADD', KEYS[5], ARGV[i + 2 * j - 1], ARGV[i + 2 * j])
    end
    i = i + 2 * n + 1
    n = tonumber(ARGV[i])
    for j = 1, n do
      local at = i + 3 * j - 2
      redis.call('XADD', KEYS[4], '*', 'due', ARGV[at], 'to', ARGV[at + 1], 'm', ARGV[at + 2])
    end
    i = i + 3 * n + 1
    redis.call('ZADD', KEYS[2], now, dedupe_id)
    if entry_id ~= '' then entry_ids[#entry_ids + 1] = entry_id end
  end
  versions[a + 1] = version
end

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if excess > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, excess - 1)
end
ack(entry_ids)
return versions
