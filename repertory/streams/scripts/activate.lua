-- Activation of an actor without a snapshot (a new one, the common case) in one round trip.
-- KEYS[1] the partition's snapshot hash   KEYS[2] the actor's event stream (ids <version>-0)
-- ARGV[1] the actor's id (its field in the snapshot hash)   ARGV[2] events to return at most
-- Returns {snapshot, {}} for an actor with a snapshot (its encoded record: the caller reads the
-- events after its version), else {nil, XRANGE's reply from the first event}.
local snapshot = redis.call('HGET', KEYS[1], ARGV[1])
if snapshot then
  return {snapshot, {}}
end
return {false, redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', ARGV[2])}
