-- rate_limit.lua: take one token from a bucket shared by every worker (a cluster-wide rate limit).
-- The bucket holds at most `capacity` tokens and refills at `rate` tokens per second; its state is
-- a hash {tokens, ts} that expires once it would be full again anyway.
--
-- KEYS[1]  the bucket (hash)
-- ARGV[1]  capacity (tokens)
-- ARGV[2]  rate (tokens per second)
-- ARGV[3]  now (unix seconds, float; passed in so every worker uses its own clock consistently)
--
-- Returns 0 if a token was taken, else the milliseconds to wait before one is available.
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
  ts = now
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return wait
