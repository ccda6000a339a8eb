-- Fenced replace: used to renew a lease and to complete a claim.
-- KEYS[1]  the entry
-- ARGV[1]  owner prefix of the running record (version, tag, owner token)
-- ARGV[2]  the new value (a running record with a new deadline, or the completed record)
-- ARGV[3]  its time to live in milliseconds
-- Returns 1 if the caller still owned the entry and it was replaced, else 0. A replace sent again
-- after its reply was lost finds its own value already there: that too is 1, with the TTL left
-- as the first write set it.
if redis.call('GETRANGE', KEYS[1], 0, string.len(ARGV[1]) - 1) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[2] then
  return 1
end
return 0
