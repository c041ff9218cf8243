-- Acquires, renews or releases one concurrent-session lease of a key, in one step, on
-- Redis's own clock. Leases are members of a sorted set scored by their expiry; expired
-- ones are dropped before counting, so a holder that stopped renewing loses its lease
-- after its ttl without anyone releasing it.
-- KEYS[1] the key's leases
-- ARGV[1] 'acquire' | 'renew' | 'release', ARGV[2] lease id, ARGV[3] ttl ms,
-- ARGV[4] the limit (acquire)
-- Returns {done (1 or 0), leases held after}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local op = ARGV[1]
local done = 0
if op == 'acquire' then
  if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
    done = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  end
elseif op == 'renew' then
  if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
    done = 1
  end
elseif op == 'release' then
  done = redis.call('ZREM', KEYS[1], ARGV[2])
end
local held = redis.call('ZCARD', KEYS[1])
if held > 0 then
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], last[2])
end
return {done, held}
