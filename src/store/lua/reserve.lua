-- Gives back the unspent admissions of earlier reservations, then reserves up to `want`
-- more from one key's rate-limit state, in one step; Redis's own clock is the clock, so
-- replicas whose clocks differ still share one limit. Keep in step with
-- `KeyRate::reserve` in src/store/ledger.rs (the embedded store's), which the
-- conformance suite holds both to.
--
-- Two rules:
-- - 'gcra': the state is the theoretical arrival time (TAT, unix ms): `k` more may be
--   admitted now while TAT + k*T - now <= burst*T.
-- - 'window': at most `limit` in any `window` ms. A sorted set logs one member per
--   admission granted, `<reservation id>:<n>`, scored by the end of the time it may be
--   spent in (now + spend + 1); it counts while that end is within the window, so two
--   admissions counted apart were made at least a window apart.
--
-- Every reservation is recorded by its id until it is given back (or `keep` ms pass):
-- asked again, it answers what it granted the first time and grants nothing more, and a
-- give-back returns a reservation's unspent admissions once, however often it is named.
--
-- KEYS[1] the key's TAT, KEYS[2] its reservations (hash: id -> "granted|at|end", end 0
-- for GCRA), KEYS[3] its window log
-- ARGV[1] 'gcra' | 'window', ARGV[2] T (gcra) or limit (window), ARGV[3] burst (gcra)
-- or window ms (window), ARGV[4] this reservation's id, ARGV[5] want, ARGV[6] spend ms,
-- ARGV[7] keep ms, ARGV[8] how many give-backs, then for each: id, unspent (-1: all)
-- Returns {granted, remaining after, retry after ms (when none fits), ms until full}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local rule = ARGV[1]
local a = tonumber(ARGV[2])
local b = tonumber(ARGV[3])
local id = ARGV[4]
local want = tonumber(ARGV[5])
local spend = tonumber(ARGV[6])
local keep = tonumber(ARGV[7])
local backs = tonumber(ARGV[8])

local function parse(v)
  local g, at, e = string.match(v, '^(%d+)|(%d+)|(%d+)$')
  return tonumber(g), tonumber(at), tonumber(e)
end

-- Records past their life go when there are many; otherwise the hash expires whole.
if redis.call('HLEN', KEYS[2]) > 16 then
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local _, at = parse(all[i + 1])
    if at + keep <= now then
      redis.call('HDEL', KEYS[2], all[i])
    end
  end
end

local tat = tonumber(redis.call('GET', KEYS[1]))
for i = 0, backs - 1 do
  local bid = ARGV[9 + 2 * i]
  local unspent = tonumber(ARGV[10 + 2 * i])
  local v = redis.call('HGET', KEYS[2], bid)
  if v then
    redis.call('HDEL', KEYS[2], bid)
    local g, _, e = parse(v)
    local u = g
    if unspent >= 0 and unspent < g then
      u = unspent
    end
    if e == 0 then
      if rule == 'gcra' and tat then
        tat = tat - u * a
      end
    else
      for j = g - u + 1, g do
        redis.call('ZREM', KEYS[3], bid .. ':' .. j)
      end
    end
  end
end

local replayed = nil
local held = redis.call('HGET', KEYS[2], id)
if held then
  replayed = parse(held)
  want = 0
end

local granted, fits, retry, full = 0, 0, 0, 0
local ends = 0
if rule == 'gcra' then
  local T, burst = a, b
  if not tat or tat < now then
    tat = now
  end
  fits = math.max(0, math.floor((burst * T - (tat - now)) / T))
  granted = math.min(want, fits)
  tat = tat + granted * T
  full = tat - now
  if full > 0 then
    redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', string.format('%d', full))
  else
    redis.call('DEL', KEYS[1])
  end
  if fits == 0 then
    retry = math.max(0, full - (burst - 1) * T)
  end
else
  local limit, window = a, b
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('%d', now - window))
  local used = redis.call('ZCARD', KEYS[3])
  fits = math.max(0, limit - used)
  granted = math.min(want, fits)
  if granted > 0 then
    ends = now + spend + 1
    local score = string.format('%d', ends)
    local args = {}
    for j = 1, granted do
      args[#args + 1] = score
      args[#args + 1] = id .. ':' .. j
      if #args >= 200 then
        redis.call('ZADD', KEYS[3], unpack(args))
        args = {}
      end
    end
    if #args > 0 then
      redis.call('ZADD', KEYS[3], unpack(args))
    end
  end
  if fits == 0 then
    -- One fits again when the entries holding the surplus have left the window.
    local surplus = used + 1 - limit
    local entry = redis.call('ZRANGE', KEYS[3], surplus - 1, surplus - 1, 'WITHSCORES')
    retry = tonumber(entry[2]) + window - now
  end
  local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
  if last[1] then
    full = tonumber(last[2]) + window - now
    redis.call('PEXPIRE', KEYS[3], string.format('%d', full))
  end
end

if granted > 0 then
  redis.call('HSET', KEYS[2], id, string.format('%d|%d|%d', granted, now, ends))
  redis.call('PEXPIRE', KEYS[2], string.format('%d', keep))
end
local remaining = fits - granted
if replayed then
  granted = replayed
  retry = 0
end
return {granted, remaining, retry, full}
