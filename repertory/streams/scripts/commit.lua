-- Commit the outcome of handling messages of actors of one or more partitions of one kind,
-- atomically: everything or nothing (G2 and G4). On a Cluster every partition's keys live in a
-- slot of their own, so there a call commits one partition; a standalone server takes several.
-- ARGV[1] consumer group      ARGV[2] now (ms)      ARGV[3] seen window (ms)
-- ARGV[4] seen-set size limit ARGV[5] number of partitions
-- then per partition: the epoch its committer holds ('' = unfenced), whether to prune its
--   seen-set ('1') or not ('0': its committer did lately), its number of actors,
--   then per actor: its expected version, its number of messages, then per message, in
--   handling order: inbox entry id ('' when not from the inbox), dedupe id, the handled
--   message as received, why it was rejected ('' = accepted), when it was handled (ms, the
--   handler's clock), n_events, events...; n_local, messages for this partition's inbox...;
--   n_timers, (due ms, message for this partition)...; n_out, (due ms or 0, target key,
--   message for another partition)... (the outbox relay forwards those after the commit: to
--   the target inbox when due is 0, else to the target timer set)
-- KEYS, per partition: its inbox, its seen-set (zset: id -> time), its epoch, its outbox, its
--   timers (zset: encoded envelope -> due ms), then per actor: its event stream, its
--   handled-message stream
-- Returns {1, version...} committed (each actor's version after it, over every partition in
-- order), {0, a, version, ...} actors a (1-based over the call) have other versions (every
-- such actor of the partitions checked, so that a caller leaves them all out at once), {-1, a, i}
-- message i (1-based) of actor a was handled before, {-2, p, epoch} partition p (1-based) is
-- fenced (its committer lost it). Only a commit returns 1; else nothing is written, except
-- that a lone message handled before is acked.
local function ack(inbox, entry_ids)
  if #entry_ids > 0 then
    redis.call('XACK', inbox, ARGV[1], unpack(entry_ids))
    redis.call('XDEL', inbox, unpack(entry_ids))
  end
end

-- Where each partition's keys and each actor's arguments start; every check before any write.
local partitions = tonumber(ARGV[5])
local plans = {}
local i = 6
local k = 1
local numbered = 0
local conflicts = {}
for p = 1, partitions do
  local epoch, trim = ARGV[i], ARGV[i + 1]
  local actors = tonumber(ARGV[i + 2])
  i = i + 3
  if epoch ~= '' then
    local current = redis.call('GET', KEYS[k + 2])
    if current ~= epoch then
      return {-2, p, current or ''}
    end
  end
  -- Every message's dedupe id, in order: the partition's seen-set is asked once for all.
  local plan = {keys = k, actors = {}, ids = {}, trim = trim == '1'}
  local messages = {}
  for a = 1, actors do
    numbered = numbered + 1
    local count = tonumber(ARGV[i + 1])
    plan.actors[a] = {tonumber(ARGV[i]), count, i + 2}
    i = i + 2
    for m = 1, count do
      plan.ids[#plan.ids + 1] = ARGV[i + 1]
      messages[#messages + 1] = {numbered, m, ARGV[i]}
      i = i + 5
      i = i + tonumber(ARGV[i]) + 1
      i = i + tonumber(ARGV[i]) + 1
      i = i + 2 * tonumber(ARGV[i]) + 1
      i = i + 3 * tonumber(ARGV[i]) + 1
    end
  end
  if #plan.ids > 0 then
    local scores = redis.call('ZMSCORE', KEYS[k + 1], unpack(plan.ids))
    local earlier = {}
    for n, id in ipairs(plan.ids) do
      if scores[n] or earlier[id] then  -- handled before, or twice in this call
        local message = messages[n]
        if partitions == 1 and #plan.ids == 1 and message[3] ~= '' then
          ack(KEYS[k], {message[3]})
        end
        return {-1, message[1], message[2]}
      end
      earlier[id] = true
    end
  end
  for a, actor in ipairs(plan.actors) do
    local version = redis.call('XLEN', KEYS[k + 3 + 2 * a])
    if version ~= actor[1] then
      conflicts[#conflicts + 1] = numbered - actors + a
      conflicts[#conflicts + 1] = version
    end
  end
  plans[p] = plan
  k = k + 5 + 2 * actors
end
if #conflicts > 0 then
  return {0, unpack(conflicts)}
end

local now = tonumber(ARGV[2])
local versions = {1}
for p = 1, partitions do
  k = plans[p].keys
  local inbox, seen, outbox, timers = KEYS[k], KEYS[k + 1], KEYS[k + 3], KEYS[k + 4]
  local entry_ids = {}
  for a, plan in ipairs(plans[p].actors) do
    local events_key, handled_key = KEYS[k + 3 + 2 * a], KEYS[k + 4 + 2 * a]
    local version, count = plan[1], plan[2]
    i = plan[3]
    for _ = 1, count do
      local entry_id, handled, rejected = ARGV[i], ARGV[i + 2], ARGV[i + 3]
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
        redis.call('XADD', inbox, '*', 'm', ARGV[i + j])
      end
      i = i + n + 1
      n = tonumber(ARGV[i])
      for j = 1, n do
        redis.call('ZADD', timers, ARGV[i + 2 * j - 1], ARGV[i + 2 * j])
      end
      i = i + 2 * n + 1
      n = tonumber(ARGV[i])
      for j = 1, n do
        local at = i + 3 * j - 2
        redis.call('XADD', outbox, '*', 'due', ARGV[at], 'to', ARGV[at + 1], 'm', ARGV[at + 2])
      end
      i = i + 3 * n + 1
      if entry_id ~= '' then entry_ids[#entry_ids + 1] = entry_id end
    end
    versions[#versions + 1] = version
  end
  local members = {}
  for n, id in ipairs(plans[p].ids) do
    members[2 * n - 1] = now
    members[2 * n] = id
  end
  if #members > 0 then
    redis.call('ZADD', seen, unpack(members))
  end
  if plans[p].trim then
    -- Older than the window, then beyond the limit (the most recent `limit` ids stay).
    redis.call('ZREMRANGEBYSCORE', seen, '-inf', now - tonumber(ARGV[3]))
    redis.call('ZREMRANGEBYRANK', seen, 0, -tonumber(ARGV[4]) - 1)
  end
  ack(inbox, entry_ids)
end
return versions
