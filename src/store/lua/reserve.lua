-- Reserves up to `want` admissions from one key's GCRA state, after giving back `back`
-- unspent ones, in one step; Redis's own clock is the clock, so replicas whose clocks
-- differ still share one limit. The state is the theoretical arrival time (TAT, unix ms):
-- `k` more may be admitted now while TAT + k*T - now <= burst*T. Keep in step with
-- `gcra::reserve` in src/ratelimit/gcra.rs (the embedded store's), which the
-- conformance suite holds both to.
-- KEYS[1] the key's TAT
-- ARGV[1] interval T (ms per admission), ARGV[2] burst, ARGV[3] want, ARGV[4] give back
-- Returns {granted, remaining after, retry after ms (when none granted), ms until full}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local T = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local back = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
tat = math.max(tat - back * T, now)
local fits = math.floor((burst * T - (tat - now)) / T)
local granted = math.max(0, math.min(want, fits))
tat = tat + granted * T
local debt = tat - now
if debt > 0 then
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', debt)
else
  redis.call('DEL', KEYS[1])
end
local retry = 0
if granted == 0 then
  retry = debt - (burst - 1) * T
end
return {granted, math.max(0, fits - granted), retry, debt}
