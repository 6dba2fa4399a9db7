-- settle.lua: ack (forget) or renew one delivery, only if it is still ours. A delivery's score in
-- unacked_index is the time we recorded it (or last renewed it); if a restore sweep gave it back and
-- another worker took it again under the same delivery tag, the score differs and we leave it alone.
--
-- KEYS[1]  unacked          (hash)
-- KEYS[2]  unacked_index    (zset)
-- ARGV[1]  delivery tag
-- ARGV[2]  '' to forget the delivery (ZREM + HDEL, kombu's ack), or a new score to renew it
-- ARGV[3..] the scores we may hold (the confirmed one, and one a renewal may have written)
--
-- Returns 1 if done, 0 if the delivery is no longer ours (nothing changed).
local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '')
local mine = false
for i = 3, #ARGV do
  if score ~= nil and score == tonumber(ARGV[i]) then mine = true end
end
if not mine then
  return 0
end
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
end
return 1
