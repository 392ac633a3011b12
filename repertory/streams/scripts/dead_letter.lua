-- Give up on an inbox entry: keep it with its reason in the dead-letter stream and ack it,
-- atomically, so it is neither lost nor delivered again.
-- KEYS[1] the partition inbox   KEYS[2] the partition dead-letter stream
-- KEYS[3] the partition epoch
-- ARGV[1] consumer group        ARGV[2] inbox entry id
-- ARGV[3] epoch the caller holds ('' = unfenced)
-- ARGV[4..] the dead letter's field/value pairs
-- Returns the dead letter's id, or false when the caller lost the partition (nothing written).
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[3] then
  return false
end
local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return id
