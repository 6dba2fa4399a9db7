-- Records that an entry fired for a tick, only while we still lead (fenced) and only once per tick.
-- KEYS[1] lock key, KEYS[2] epoch key, KEYS[3] last-run hash
-- ARGV[1] token, ARGV[2] epoch, ARGV[3] entry name, ARGV[4] tick (unix seconds)
-- returns 1 recorded (send it now), -1 this tick or a later one is already recorded, 0 not the leader
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
local prev = redis.call('HGET', KEYS[3], ARGV[3])
if prev and tonumber(prev) >= tonumber(ARGV[4]) then
  return -1
end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
return 1
