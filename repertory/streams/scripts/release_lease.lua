-- Release a partition lease if this node still holds it.
-- KEYS[1] the partition lease   ARGV[1] node id
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
