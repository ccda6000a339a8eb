-- Claim for servers older than Redis 7.0, where SET ... NX GET is not available.
-- Same reply as SET KEYS[1] ARGV[1] NX PX ARGV[2] GET: nil when the key was free and is now
-- claimed, else the value that holds it (nothing is written then).
-- KEYS[1]  the entry
-- ARGV[1]  the running record
-- ARGV[2]  the lease in milliseconds
local current = redis.call('GET', KEYS[1])
if current then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
