-- Creates a key record and its tenant-index entry together, refusing an existing id.
-- KEYS[1] key record (hash), KEYS[2] tenant index (sorted set)
-- ARGV[1] record JSON, ARGV[2] key id
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'data', ARGV[1])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
return 1
