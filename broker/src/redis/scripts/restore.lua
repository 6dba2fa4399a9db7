-- restore.lua: move one unacked message back to list(s), only if its record is unchanged
-- (a compare-and-swap: the caller read the record, rewrote the envelope in Rust, and must not push
-- twice if someone else restored or acked it in between). Used by the restore sweep, reject with
-- requeue, consumer close, and dead-lettering.
--
-- KEYS[1]  unacked          (hash)
-- KEYS[2]  unacked_index    (zset)
-- KEYS[3..] destination lists (none: just forget the message)
-- ARGV[1]  delivery tag
-- ARGV[2]  the record as read from `unacked` (must still be there, byte for byte)
-- ARGV[3]  the envelope to push
-- ARGV[4]  'L' to LPUSH (back of the queue), 'R' to RPUSH (taken next)
-- ARGV[5..] the unacked_index scores the caller may hold (none = any): a consumer restoring its own
--          delivery must not move one that another worker took again under the same tag
--
-- Returns 1 if the message was moved, 0 if the record had changed or was gone (nothing done).
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
if #ARGV >= 5 then
  local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '')
  local mine = false
  for i = 5, #ARGV do
    if score ~= nil and score == tonumber(ARGV[i]) then mine = true end
  end
  if not mine then
    return 0
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
local push = 'RPUSH'
if ARGV[4] == 'L' then push = 'LPUSH' end
for i = 3, #KEYS do
  redis.call(push, KEYS[i], ARGV[3])
end
return 1
