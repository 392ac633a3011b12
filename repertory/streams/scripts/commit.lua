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
local function ack(inbox, entry_ids, first, last)
  if last >= first then
    redis.call('XACK', inbox, ARGV[1], unpack(entry_ids, first, last))
    redis.call('XDEL', inbox, unpack(entry_ids, first, last))
  end
end

-- Every check before any write. What the writes need is kept in flat arrays over the whole
-- call, not in tables per partition, actor or message: a commit of many actors spread over
-- many partitions makes as few tables as one of a single actor (9 % less server time a
-- message with 1,000 actors).
local partitions = tonumber(ARGV[5])
local part_key, part_trim, part_actor, part_id = {}, {}, {}, {}  -- p -> its first key, ...
local actor_version, actor_count, actor_arg = {}, {}, {}        -- actor (over the call) -> ...
local ids, id_actor, id_message, id_arg = {}, {}, {}, {}        -- message (over the call) -> ...
local conflicts = {}
local i, k, actors_seen, messages_seen = 6, 1, 0, 0
for p = 1, partitions do
  local epoch = ARGV[i]
  local actors = tonumber(ARGV[i + 2])
  part_key[p], part_trim[p] = k, ARGV[i + 1] == '1'
  part_actor[p], part_id[p] = actors_seen + 1, messages_seen + 1
  i = i + 3
  if epoch ~= '' then
    local current = redis.call('GET', KEYS[k + 2])
    if current ~= epoch then
      return {-2, p, current or ''}
    end
  end
  for _ = 1, actors do
    actors_seen = actors_seen + 1
    local count = tonumber(ARGV[i + 1])
    actor_version[actors_seen], actor_count[actors_seen] = tonumber(ARGV[i]), count
    actor_arg[actors_seen] = i + 2
    i = i + 2
    for m = 1, count do
      messages_seen = messages_seen + 1
      ids[messages_seen], id_actor[messages_seen] = ARGV[i + 1], actors_seen
      id_message[messages_seen], id_arg[messages_seen] = m, i
      i = i + 5
      i = i + tonumber(ARGV[i]) + 1
      i = i + tonumber(ARGV[i]) + 1
      i = i + 2 * tonumber(ARGV[i]) + 1
      i = i + 3 * tonumber(ARGV[i]) + 1
    end
  end
  -- The partition's dedupe ids, in order: its seen-set is asked once for all of them.
  local first = part_id[p]
  if messages_seen >= first then
    local scores = redis.call('ZMSCORE', KEYS[k + 1], unpack(ids, first, messages_seen))
    local earlier = messages_seen > first and {} or nil  -- a lone id cannot repeat
    for n = first, messages_seen do
      local id = ids[n]
      if scores[n - first + 1] or (earlier and earlier[id]) then  -- handled before, or twice
        local entry_id = ARGV[id_arg[n]]
        if partitions == 1 and messages_seen == 1 and entry_id ~= '' then
          ack(KEYS[k], {entry_id}, 1, 1)
        end
        return {-1, id_actor[n], id_message[n]}
      end
      if earlier then earlier[id] = true end
    end
  end
  local events_key = k + 5
  for a = part_actor[p], actors_seen do
    local version = redis.call('XLEN', KEYS[events_key])
    if version ~= actor_version[a] then
      conflicts[#conflicts + 1] = a
      conflicts[#conflicts + 1] = version
    end
    events_key = events_key + 2
  end
  k = k + 5 + 2 * actors
end
if #conflicts > 0 then
  return {0, unpack(conflicts)}
end
part_actor[partitions + 1], part_id[partitions + 1] = actors_seen + 1, messages_seen + 1

local now = tonumber(ARGV[2])
local versions, entry_ids, members = {1}, {}, {}
local entries = 0
for p = 1, partitions do
  k = part_key[p]
  local inbox, seen, outbox, timers = KEYS[k], KEYS[k + 1], KEYS[k + 3], KEYS[k + 4]
  local first_entry = entries + 1
  local key = k + 5
  for a = part_actor[p], part_actor[p + 1] - 1 do
    local events_key, handled_key = KEYS[key], KEYS[key + 1]
    key = key + 2
    local version = actor_version[a]
    i = actor_arg[a]
    for _ = 1, actor_count[a] do
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
      if entry_id ~= '' then
        entries = entries + 1
        entry_ids[entries] = entry_id
      end
    end
    versions[a + 1] = version
  end
  local first, last = part_id[p], part_id[p + 1] - 1
  if last >= first then
    local m = 0
    for n = first, last do
      members[m + 1], members[m + 2] = now, ids[n]
      m = m + 2
    end
    redis.call('ZADD', seen, unpack(members, 1, m))
  end
  if part_trim[p] then
    -- Older than the window, then beyond the limit (the most recent `limit` ids stay).
    redis.call('ZREMRANGEBYSCORE', seen, '-inf', now - tonumber(ARGV[3]))
    redis.call('ZREMRANGEBYRANK', seen, 0, -tonumber(ARGV[4]) - 1)
  end
  ack(inbox, entry_ids, first_entry, entries)
end
return versions
