-- Deletes a key record and its tenant-index entry and appends the deletion event in one
-- step.
-- KEYS[1] key record (hash), KEYS[2] revocation stream, KEYS[3] tenant index
-- ARGV[1] deleted-at (unix ms), ARGV[2] key id, ARGV[3] stream max length (approximate),
-- ARGV[4] the event kind's name (EventKind::as_str: keygate's one mapping)
local fields = redis.call('HMGET', KEYS[1], 'data', 'revoked_at_ms', 'used_allowed',
  'used_denied', 'last_used_ms')
if not fields[1] then
  return false
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
  'key_id', ARGV[2], 'kind', ARGV[4], 'at_ms', ARGV[1])
return fields
