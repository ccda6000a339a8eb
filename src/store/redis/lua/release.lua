-- Fenced release: deletes a running entry so the key can be claimed again.
-- KEYS[1]  the entry
-- ARGV[1]  owner prefix of the running record (version, tag, owner token)
-- Returns 1 if the caller still owned the entry and it was deleted, else 0.
if redis.call('GETRANGE', KEYS[1], 0, string.len(ARGV[1]) - 1) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
