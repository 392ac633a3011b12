-- Activation of actors of one partition in one round trip: new ones (the common case) and
-- short logs need nothing more.
-- KEYS[1] the partition's snapshot hash   KEYS[2..n+1] the actors' event streams (ids <version>-0)
-- ARGV[1] events to return at most per actor   ARGV[2..n+1] the actors' ids (their snapshot fields)
-- Returns, per actor, {snapshot, {}} for one with a snapshot (its encoded record: the caller
-- reads the events after its version), else {false, XRANGE's reply from its first event}.
local activations = {}
for index = 2, #KEYS do
  local snapshot = redis.call('HGET', KEYS[1], ARGV[index])
  if snapshot then
    activations[index - 1] = {snapshot, {}}
  else
    activations[index - 1] = {false, redis.call('XRANGE', KEYS[index], '-', '+', 'COUNT', ARGV[1])}
  end
end
return activations
