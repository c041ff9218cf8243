-- Grants or withdraws a partner's right to act for a tenant and appends the change to
-- the revocation stream in one step: no replica can see the new state without the
-- event. Granting what is granted, or withdrawing what is not, changes nothing and
-- appends nothing.
-- KEYS[1] the partner's tenants (set), KEYS[2] the tenant's partners (set),
-- KEYS[3] revocation stream
-- ARGV[1] partner id, ARGV[2] tenant id, ARGV[3] '1' to grant, '0' to withdraw,
-- ARGV[4] at (unix ms), ARGV[5] stream max length (approximate), ARGV[6] the event's
-- name (keygate's one mapping)
local changed
if ARGV[3] == '1' then
  changed = redis.call('SADD', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
else
  changed = redis.call('SREM', KEYS[1], ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[1])
end
if changed == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
    'kind', ARGV[6], 'partner_id', ARGV[1], 'tenant_id', ARGV[2], 'at_ms', ARGV[4])
end
return changed
