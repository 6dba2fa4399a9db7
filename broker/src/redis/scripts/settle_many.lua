-- settle_many.lua: ack (forget) many deliveries at once, each only if it is still ours (settle.lua's
-- check, once per delivery). Used to group the acks that arrive while one such call is in flight.
--
-- KEYS[1]  unacked          (hash)
-- KEYS[2]  unacked_index    (zset)
-- ARGV     groups of: delivery tag, n, then the n scores we may hold for it
--
-- The scores are read with one ZMSCORE (Redis ≥ 6.2), not one ZSCORE per delivery.
--
-- Returns one integer per delivery, in order: 1 if forgotten, 0 if it is no longer ours (untouched).
local out = {}
local mine = {}
-- The tags and their scores in unacked_index, looked up with one ZMSCORE.
local tags = {}
local i = 1
while i <= #ARGV do
  tags[#tags + 1] = ARGV[i]
  i = i + 2 + tonumber(ARGV[i + 1])
end
local scores = {}
if #tags > 0 then
  scores = redis.call('ZMSCORE', KEYS[2], unpack(tags))
end
i = 1
local k = 0
while i <= #ARGV do
  k = k + 1
  local tag = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local score = tonumber(scores[k] or '')
  local ok = 0
  if score ~= nil then
    for j = 1, n do
      if score == tonumber(ARGV[i + 1 + j]) then ok = 1 end
    end
  end
  if ok == 1 then mine[#mine + 1] = tag end
  out[#out + 1] = ok
  i = i + 2 + n
end
if #mine > 0 then
  redis.call('ZREM', KEYS[2], unpack(mine))
  redis.call('HDEL', KEYS[1], unpack(mine))
end
return out
