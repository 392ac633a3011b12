-- Settle a consumed entry exactly once: ack and delete it, then append one message to each
-- further stream (a result, a retry, a dead letter). Whoever settles first wins; a worker whose
-- task was taken over and already settled gets 0 and writes nothing.
-- KEYS[1] the stream of the entry   KEYS[2..] streams to append to
-- ARGV[1] consumer group   ARGV[2] entry id   ARGV[3..] one message per KEYS[2..]
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('XDEL', KEYS[1], ARGV[2])
for i = 2, #KEYS do
  redis.call('XADD', KEYS[i], '*', 'm', ARGV[i + 1])
end
return 1
