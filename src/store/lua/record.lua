-- Every change of one key record in a partitioned layout. The record is one string,
-- `<revoked_at_ms>|<allowed>|<denied>|<last_used_ms>|<packed record>` (the first four
-- empty until set), so that revoking and counting use change the fields in front and
-- never read the packed bytes (src/store/packed.rs). Revoke, update and delete append
-- their event to the partition's stream in the same step, as the hash layout's scripts do.
-- ARGV[1] the operation:
--   'revoke' KEYS[1] record, KEYS[2] stream; ARGV[2] at (unix ms), ARGV[3] key id,
--     ARGV[4] stream max length (approximate), ARGV[5] the event's name. A second revoke
--     changes nothing and appends nothing. Returns the record as it now is, or false.
--   'update' KEYS as revoke; ARGV[2] the packed record as read, ARGV[3] the new one,
--     ARGV[4] at, ARGV[5] key id, ARGV[6] max length, ARGV[7] the event's name. Returns 1
--     when written, 0 when the record changed since it was read, -1 when there is none.
--   'delete' KEYS and ARGV[2..5] as revoke. Returns the removed record, or false.
--   'usage'  KEYS[i] records; ARGV[3i-1] allowed, ARGV[3i] denied, ARGV[3i+1] last used.
--     A record deleted meanwhile is skipped, not recreated. Returns the number of keys.
local function split(s)
  local f = {}
  local start = 1
  for i = 1, 4 do
    local bar = string.find(s, '|', start, true)
    f[i] = string.sub(s, start, bar - 1)
    start = bar + 1
  end
  return f, string.sub(s, start)
end
local function join(f, packed)
  return f[1] .. '|' .. f[2] .. '|' .. f[3] .. '|' .. f[4] .. '|' .. packed
end
local function event(stream, maxlen, key_id, kind, at)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'key_id', key_id, 'kind', kind,
    'at_ms', at)
end

local op = ARGV[1]
if op == 'usage' then
  for i, key in ipairs(KEYS) do
    local s = redis.call('GET', key)
    if s then
      local f, packed = split(s)
      local base = (i - 1) * 3 + 1
      f[2] = string.format('%d', (tonumber(f[2]) or 0) + tonumber(ARGV[base + 1]))
      f[3] = string.format('%d', (tonumber(f[3]) or 0) + tonumber(ARGV[base + 2]))
      if tonumber(ARGV[base + 3]) > (tonumber(f[4]) or 0) then
        f[4] = ARGV[base + 3]
      end
      redis.call('SET', key, join(f, packed))
    end
  end
  return #KEYS
end

local s = redis.call('GET', KEYS[1])
if op == 'revoke' then
  if not s then
    return false
  end
  local f, packed = split(s)
  if f[1] == '' then
    f[1] = ARGV[2]
    s = join(f, packed)
    redis.call('SET', KEYS[1], s)
    event(KEYS[2], ARGV[4], ARGV[3], ARGV[5], ARGV[2])
  end
  return s
elseif op == 'update' then
  if not s then
    return -1
  end
  local f, packed = split(s)
  if packed ~= ARGV[2] then
    return 0
  end
  redis.call('SET', KEYS[1], join(f, ARGV[3]))
  event(KEYS[2], ARGV[6], ARGV[5], ARGV[7], ARGV[4])
  return 1
elseif op == 'delete' then
  if not s then
    return false
  end
  redis.call('DEL', KEYS[1])
  event(KEYS[2], ARGV[4], ARGV[3], ARGV[5], ARGV[2])
  return s
end
return redis.error_reply('record.lua: unknown operation ' .. tostring(op))
