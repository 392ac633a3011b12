-- Put a dead letter's message back on its partition inbox and remove the dead letter, in one
-- step: requeued once however often this runs, and never lost in between.
-- KEYS[1] the partition dead-letter stream   KEYS[2] the partition inbox
-- ARGV[1] the dead letter's entry id
-- Returns the new inbox entry id, or false when there is no such dead letter (any more).
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entries == 0 then
  return false
end
local fields = entries[1][2]
local data = nil
for i = 1, #fields, 2 do
  if fields[i] == 'data' then data = fields[i + 1] end
end
if data == nil then
  return false
end
local id = redis.call('XADD', KEYS[2], '*', 'm', data)
redis.call('XDEL', KEYS[1], ARGV[1])
return id
