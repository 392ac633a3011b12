-- Add one message to each of several streams, in order, in one call (concurrent sends).
-- KEYS[i] a stream   ARGV[i] the encoded message for KEYS[i], added as its field 'm'
-- Returns, per message, its entry id, or the error its XADD raised (the others still go in).
local ids = {}
for i, key in ipairs(KEYS) do
  ids[i] = redis.pcall('XADD', key, '*', 'm', ARGV[i])
end
return ids
