-- Activation of actors in one round trip: new ones (the common case) and short logs need
-- nothing more. The actors may be of several partitions where one script reaches their keys
-- (a standalone server; on a Cluster, one partition's actors at a time).
-- KEYS, per actor: its partition's snapshot hash, its event stream (ids <version>-0)
-- ARGV[1] events to return at most per actor   ARGV[2..n+1] the actors' ids (their snapshot fields)
-- Returns, per actor, {snapshot, {}} for one with a snapshot (its encoded record: the caller
-- reads the events after its version), else {false, XRANGE's reply from its first event}.
local activations = {}
for index = 1, #ARGV - 1 do
  local snapshot = redis.call('HGET', KEYS[2 * index - 1], ARGV[index + 1])
  if snapshot then
    activations[index] = {snapshot, {}}
  else
    activations[index] = {false, redis.call('XRANGE', KEYS[2 * index], '-', '+', 'COUNT', ARGV[1])}
  end
end
return activations
