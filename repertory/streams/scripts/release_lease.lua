-- Release a partition lease if this node is its owner (lapsed or not: either way it is free
-- once released, and the epoch stays, so the next owner bumps it).
-- KEYS[1] the partition lease (hash: owner, expires ms)   ARGV[1] node id
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
