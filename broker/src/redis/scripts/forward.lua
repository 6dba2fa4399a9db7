-- forward.lua: move parked messages that are due back to their queues (RPUSH: they are taken next).
-- Each member is removed and pushed in this one script, so several workers forwarding at once never
-- push a message twice.
--
-- KEYS[1]  scheduled        (zset: member "<destination list>\n<envelope>", score = due unix time)
-- ARGV[1]  now (unix seconds)
-- ARGV[2]  most members to move in this call
--
-- Returns how many messages were moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local nl = string.find(member, '\n', 1, true)
  if nl then
    redis.call('RPUSH', string.sub(member, 1, nl - 1), string.sub(member, nl + 1))
  end
end
return #due
