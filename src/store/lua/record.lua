-- Every change of one key record in a partitioned layout. Records are fields of a
-- partition's bucket hashes (field: the key id); each is one string,
-- `<revoked_at_ms>|<allowed>|<denied>|<last_used_ms>|<packed record>` (the first four
-- empty until set), and its verifier, if any, is field `<key id>:v` (`verifier.lua`), so that revoking and counting use change the fields in front and
-- never read the packed bytes (src/store/packed.rs). Revoke, update and delete append
-- their event to the partition's stream in the same step, as the hash layout's scripts do.
-- ARGV[1] the operation, ARGV[2] the key id (the record's field):
--   'revoke' KEYS[1] bucket, KEYS[2] stream; ARGV[3] at (unix ms), ARGV[4] key id,
--     ARGV[5] stream max length (approximate), ARGV[6] the event's name. A second revoke
--     changes nothing and appends nothing. Returns the record as it now is, or false.
--   'update' KEYS as revoke; ARGV[3] the packed record as read, ARGV[4] the new one,
--     ARGV[5] at, ARGV[6] key id, ARGV[7] max length, ARGV[8] the event's name. Returns 1
--     when written, 0 when the record changed since it was read, -1 when there is none.
--   'delete' KEYS and ARGV[3..6] as revoke. Returns the removed record, or false.
--   'usage'  (no ARGV[2]) KEYS[i] bucket of the i-th key; ARGV[4i-2] its key id,
--     ARGV[4i-1] allowed, ARGV[4i] denied, ARGV[4i+1] last used. A record deleted
--     meanwhile is skipped, not recreated. Returns the number of keys.
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
  for i, bucket in ipairs(KEYS) do
    local base = (i - 1) * 4 + 1
    local field = ARGV[base + 1]
    local s = redis.call('HGET', bucket, field)
    if s then
      local f, packed = split(s)
      f[2] = string.format('%d', (tonumber(f[2]) or 0) + tonumber(ARGV[base + 2]))
      f[3] = string.format('%d', (tonumber(f[3]) or 0) + tonumber(ARGV[base + 3]))
      if tonumber(ARGV[base + 4]) > (tonumber(f[4]) or 0) then
        f[4] = ARGV[base + 4]
      end
      redis.call('HSET', bucket, field, join(f, packed))
    end
  end
  return #KEYS
end

local field = ARGV[2]
local s = redis.call('HGET', KEYS[1], field)
if op == 'revoke' then
  if not s then
    return false
  end
  local f, packed = split(s)
  if f[1] == '' then
    f[1] = ARGV[3]
    s = join(f, packed)
    redis.call('HSET', KEYS[1], field, s)
    -- A revoked key's verifier goes with its state (`verifier.lua`).
    redis.call('HDEL', KEYS[1], field .. ':v')
    event(KEYS[2], ARGV[5], ARGV[4], ARGV[6], ARGV[3])
  end
  return s
elseif op == 'update' then
  if not s then
    return -1
  end
  local f, packed = split(s)
  if packed ~= ARGV[3] then
    return 0
  end
  redis.call('HSET', KEYS[1], field, join(f, ARGV[4]))
  event(KEYS[2], ARGV[7], ARGV[6], ARGV[8], ARGV[5])
  return 1
elseif op == 'delete' then
  if not s then
    return false
  end
  redis.call('HDEL', KEYS[1], field, field .. ':v')
  event(KEYS[2], ARGV[5], ARGV[4], ARGV[6], ARGV[3])
  return s
end
return redis.error_reply('record.lua: unknown operation ' .. tostring(op))
