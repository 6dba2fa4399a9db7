-- Takes the beat leader lock if it is free and bumps the fencing epoch.
-- KEYS[1] lock key, KEYS[2] epoch key
-- ARGV[1] token, ARGV[2] lease in milliseconds
-- returns the new epoch (integer), or false if another beat holds the lock
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
return redis.call('INCR', KEYS[2])
