-- Deletes the lock, only if it is still ours.
-- KEYS[1] lock key
-- ARGV[1] token
-- returns 1 if released, 0 otherwise
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
