-- Resets the lock's lease to the full period, only if the lock is still ours.
-- KEYS[1] lock key
-- ARGV[1] token, ARGV[2] lease in milliseconds
-- returns 1 if renewed, 0 if the lock is gone or held by another beat
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
