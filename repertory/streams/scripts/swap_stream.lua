-- Replace an actor's event stream by its rewritten copy (a migration), if nothing was appended
-- since the copy was made: the copy holds the same entry ids, so versions do not change.
-- KEYS[1] the actor's event stream   KEYS[2] the rewritten copy (same hash tag)
-- ARGV[1] how many entries the copy holds   ARGV[2] the id of its last entry
-- Returns {1, length} swapped, or {0, length} when the stream moved on (copy the rest, retry).
local length = redis.call('XLEN', KEYS[1])
if length ~= tonumber(ARGV[1]) then
  return {0, length}
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if length > 0 and last[1][1] ~= ARGV[2] then
  return {0, length}
end
redis.call('RENAME', KEYS[2], KEYS[1])
return {1, length}
