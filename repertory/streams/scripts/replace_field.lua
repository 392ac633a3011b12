-- Set a hash field only if it still holds the value the caller read (a migrated snapshot must
-- not overwrite a newer one a node saved meanwhile).
-- KEYS[1] the hash   ARGV[1] the field   ARGV[2] the expected value   ARGV[3] the new value
-- Returns 1 replaced, 0 the field changed meanwhile (nothing written).
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
