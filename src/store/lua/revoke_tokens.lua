-- Records a JWT revocation and appends it to the revocation stream in one step, so no
-- replica can load the revocation without the event or see the event before the
-- revocation can be loaded. The merge with an earlier revocation of the same rule is
-- computed by keygate; this only writes it if nobody wrote that rule in between.
-- KEYS[1] revocations (hash: rule key -> JSON), KEYS[2] their expiries (sorted set),
-- KEYS[3] revocation stream
-- ARGV[1] rule key, ARGV[2] the JSON read before ('' for none), ARGV[3] the new JSON,
-- ARGV[4] its expiry (unix ms), ARGV[5] now (unix ms), ARGV[6] stream max length
-- (approximate), ARGV[7] the stream's name for this event (keygate's one mapping)
-- Returns 1 when written, 0 when the rule changed since it was read.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (current or '') ~= ARGV[2] then
  return 0
end
-- Revocations no token can still match go, a bounded number per write.
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[5], 'LIMIT', 0, 100)
for _, rule in ipairs(old) do
  if rule ~= ARGV[1] then
    redis.call('HDEL', KEYS[1], rule)
    redis.call('ZREM', KEYS[2], rule)
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*',
  'kind', ARGV[7], 'rule', ARGV[3], 'at_ms', ARGV[5])
return 1
