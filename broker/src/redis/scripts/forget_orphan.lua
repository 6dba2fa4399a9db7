-- forget_orphan.lua: drop a delivery tag from unacked_index when `unacked` has no record for it
-- (left over by a crash between kombu's ZADD and HSET, or by an ack that ran half way). Without this
-- a sweep would find the same stale tag forever.
--
-- KEYS[1]  unacked          (hash)
-- KEYS[2]  unacked_index    (zset)
-- ARGV[1]  delivery tag
--
-- Returns 1 if the tag was removed, 0 if a record exists (left alone).
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
return redis.call('ZREM', KEYS[2], ARGV[1])
