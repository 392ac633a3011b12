-- Append a message to a stream once per id, however often it is called: the effect of a
-- follower that may run an event twice (after a crash, a restart from its first event).
-- KEYS[1] the set of ids already appended   KEYS[2] the stream
-- ARGV[1] the id   ARGV[2] the message
-- Returns 1 when appended, 0 when the id was seen before.
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
return 1
