-- Reads, or records on first use, how many stream partitions the data of a namespace is
-- written with, in one step, so that two keygates starting at once cannot record two.
-- Data an earlier keygate wrote before the number was recorded (its revocation stream or
-- audit trail exists) has one partition; that is recorded only by a keygate of one.
-- KEYS[1] the marker, KEYS[2] the one-partition revocation stream, KEYS[3] the audit trail
-- ARGV[1] the number this keygate is configured with
-- Returns the number the data is written with.
local recorded = redis.call('GET', KEYS[1])
if recorded then
  return recorded
end
if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then
  if ARGV[1] == '1' then
    redis.call('SET', KEYS[1], '1')
  end
  return '1'
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
