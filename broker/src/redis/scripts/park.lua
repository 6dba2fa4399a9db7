-- park.lua: move one unacked message into the schedule of messages not due yet, only if its record is
-- unchanged and the delivery is still ours (a compare-and-swap, like restore.lua). The message leaves
-- `unacked`, so no visibility timeout can hand it out early, and it is kept in Redis, not in a worker.
--
-- KEYS[1]  unacked          (hash)
-- KEYS[2]  unacked_index    (zset)
-- KEYS[3]  scheduled        (zset: member "<destination list>\n<envelope>", score = due unix time)
-- ARGV[1]  delivery tag
-- ARGV[2]  the record as read from `unacked` (must still be there, byte for byte)
-- ARGV[3]  the member to add ("<destination list>\n<envelope>")
-- ARGV[4]  due time (unix seconds)
-- ARGV[5..] the unacked_index scores the caller may hold
--
-- Returns 1 if parked, 0 if the record changed or the delivery is no longer ours (nothing done).
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '')
local mine = false
for i = 5, #ARGV do
  if score ~= nil and score == tonumber(ARGV[i]) then mine = true end
end
if not mine then
  return 0
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
