-- Stores one task state the way Celery's Redis backend does, atomically.
--
-- KEYS[1]  the meta key (`celery-task-meta-<id>`, with any global prefix); also the channel.
-- ARGV[1]  expiry in whole seconds; 0 = keep forever (SET instead of SETEX).
-- ARGV[2]  the meta document (JSON), written and published as given, never re-encoded.
--
-- A task whose stored status is already SUCCESS keeps it: the write is dropped and nothing is
-- published (Celery's guard against duplicate deliveries). Returns 1 if stored, 0 if dropped.
local current = redis.call('GET', KEYS[1])
if current then
    local ok, doc = pcall(cjson.decode, current)
    if ok and type(doc) == 'table' and doc['status'] == 'SUCCESS' then
        return 0
    end
end
local expires = tonumber(ARGV[1])
if expires and expires > 0 then
    redis.call('SETEX', KEYS[1], expires, ARGV[2])
else
    redis.call('SET', KEYS[1], ARGV[2])
end
redis.call('PUBLISH', KEYS[1], ARGV[2])
return 1
