-- unlock.lua: release the `unacked_mutex` lock only if we still hold it (redis-py's Lock.release).
--
-- KEYS[1]  unacked_mutex
-- ARGV[1]  the token we locked with
--
-- Returns 1 if released, 0 if the lock had expired or belongs to someone else.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
