-- Stores many task states at once, each exactly as store.lua does (Celery's Redis backend layout,
-- the same SUCCESS guard, the same publish). Used to group the writes that arrive while one such
-- call is in flight.
--
-- KEYS[i]    the meta key of state i (also its channel)
-- ARGV[1]    expiry in whole seconds; 0 = keep forever
-- ARGV[1+i]  the meta document of state i
--
-- Returns one integer per state: 1 if stored, 0 if dropped (the task was already SUCCESS).
local expires = tonumber(ARGV[1])
local out = {}
if #KEYS == 0 then
    return out
end
-- Every state's current document with one MGET; a key stored earlier in this same call is read
-- again (the MGET predates that write).
local before = redis.call('MGET', unpack(KEYS))
local written = {}
for i = 1, #KEYS do
    local stored = 1
    local current = before[i]
    if written[KEYS[i]] then
        current = redis.call('GET', KEYS[i])
    end
    if current then
        local ok, doc = pcall(cjson.decode, current)
        if ok and type(doc) == 'table' and doc['status'] == 'SUCCESS' then
            stored = 0
        end
    end
    if stored == 1 then
        if expires and expires > 0 then
            redis.call('SETEX', KEYS[i], expires, ARGV[1 + i])
        else
            redis.call('SET', KEYS[i], ARGV[1 + i])
        end
        redis.call('PUBLISH', KEYS[i], ARGV[1 + i])
        written[KEYS[i]] = true
    end
    out[i] = stored
end
return out
