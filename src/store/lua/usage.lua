-- Adds one batch of usage counts to key records, in one step: for each key, its allowed
-- and denied requests since the last batch, and the latest use (kept if newer). A key
-- deleted meanwhile is skipped, not recreated.
-- KEYS[i] a key record (hash)
-- ARGV[3i-2] allowed, ARGV[3i-1] denied, ARGV[3i] last used (unix ms)
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local base = (i - 1) * 3
    redis.call('HINCRBY', key, 'used_allowed', ARGV[base + 1])
    redis.call('HINCRBY', key, 'used_denied', ARGV[base + 2])
    local last = tonumber(redis.call('HGET', key, 'last_used_ms') or '0')
    if tonumber(ARGV[base + 3]) > last then
      redis.call('HSET', key, 'last_used_ms', ARGV[base + 3])
    end
  end
end
return #KEYS
