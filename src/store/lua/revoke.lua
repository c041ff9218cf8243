-- Marks a key revoked and appends the revocation event in one step, so no replica can
-- see the new state without the event or the event without the state. A second revoke
-- changes nothing and appends nothing.
-- KEYS[1] key record (hash), KEYS[2] revocation stream
-- ARGV[1] revoked-at (unix ms), ARGV[2] key id, ARGV[3] stream max length (approximate),
-- ARGV[4] the event kind's name (EventKind::as_str: keygate's one mapping)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
if redis.call('HSETNX', KEYS[1], 'revoked_at_ms', ARGV[1]) == 1 then
  -- A revoked key's verifier goes with its state (`verifier.lua`).
  redis.call('HDEL', KEYS[1], 'verifier')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
    'key_id', ARGV[2], 'kind', ARGV[4], 'at_ms', ARGV[1])
end
return redis.call('HMGET', KEYS[1], 'data', 'revoked_at_ms', 'used_allowed', 'used_denied',
  'last_used_ms')
