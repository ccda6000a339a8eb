-- Forget: deletes a completed record so the key runs again; a running entry is left alone.
-- KEYS[1]  the entry
-- ARGV[1]  the first bytes of a completed record (version, tag)
-- Returns 1 if a completed record was deleted, else 0.
if redis.call('GETRANGE', KEYS[1], 0, string.len(ARGV[1]) - 1) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
