-- Replaces a key record's data if it is still what the caller read (compare-and-set),
-- and appends an `updated` event in the same step, so replicas drop the cached principal
-- the moment a key's scopes or expiry change.
-- KEYS[1] key record (hash), KEYS[2] revocation stream
-- ARGV[1] record JSON as read, ARGV[2] new record JSON, ARGV[3] at (unix ms),
-- ARGV[4] key id, ARGV[5] stream max length (approximate), ARGV[6] the event kind's name
-- (EventKind::as_str: keygate's one mapping)
local current = redis.call('HGET', KEYS[1], 'data')
if not current then
  return -1
end
if current ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'data', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
  'key_id', ARGV[4], 'kind', ARGV[6], 'at_ms', ARGV[3])
return 1
