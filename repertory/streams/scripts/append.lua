-- Append events to one actor's stream if its version is the expected one.
-- KEYS[1]  the actor's event stream (entry ids are <version>-0)
-- ARGV[1]  expected version, or -1 for "any"
-- ARGV[2..] encoded event records, in order
-- Returns {1, new_version} on success, {0, current_version} on a version conflict.
-- Events are never deleted from an actor stream, so XLEN is its version; if that ever stops
-- holding, XADD with an explicit id below the last one fails loudly instead of writing a gap.
local current = redis.call('XLEN', KEYS[1])
local expected = tonumber(ARGV[1])
if expected >= 0 and expected ~= current then
  return {0, current}
end
for i = 2, #ARGV do
  current = current + 1
  redis.call('XADD', KEYS[1], current .. '-0', 'e', ARGV[i])
end
return {1, current}
