-- Clears a finished chord's join data if the caller still holds the claim, and leaves a `done`
-- marker so a late duplicate of a header member cannot start the chord again (Celery 5.7's cleanup).
--
-- KEYS: .c .j .t .s .d   ARGV[1] the claim token   ARGV[2] how long the marker lives, seconds
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
    redis.call('SET', KEYS[1], 'done', 'EX', tonumber(ARGV[2]))
    return 1
end
return 0
