-- Leaves a key's verifier beside its record, only while the record is there and not
-- revoked (a verification that finished after a revocation or deletion must not bring
-- one back). Revoking and deleting remove it in their own scripts.
-- ARGV[1] the record format: 'hash' (KEYS[1] the key's hash; the verifier is its field
--   'verifier') or 'packed' (KEYS[1] the partition bucket; the record is field ARGV[3],
--   the verifier field ARGV[3] .. ':v', the record's revocation time the text before
--   its first '|'), ARGV[2] the verifier.
-- Returns 1 when written, 0 when not.
if ARGV[1] == 'hash' then
  if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'revoked_at_ms') == 1 then
    return 0
  end
  redis.call('HSET', KEYS[1], 'verifier', ARGV[2])
  return 1
end
local s = redis.call('HGET', KEYS[1], ARGV[3])
if not s or string.sub(s, 1, 1) ~= '|' then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[3] .. ':v', ARGV[2])
return 1
