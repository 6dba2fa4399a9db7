-- Adds one chord header member's outcome to the native join, Celery 5.7's layout, atomically.
--
-- KEYS[1] .j  sorted set of entries `[1, tid, state, result]`, scored by group_index
-- KEYS[2] .t  extra size added by `add_to_chord` (may be missing)
-- KEYS[3] .s  the chord size, set by the producer before the header was sent
-- KEYS[4] .d  set of `tid:score` already counted (redeliveries are not counted twice)
-- KEYS[5] the saved group key (`celery-taskset-meta-<gid>`), only given an expiry
-- KEYS[6] .c  the claim: a token while a member sends the body, `done` after
-- ARGV[1] task id   ARGV[2] entry JSON   ARGV[3] score (group_index or +inf)
-- ARGV[4] expiry of the join keys in seconds (0 = none)   ARGV[5] claim expiry in seconds
-- ARGV[6] this member's claim token (stable across its redeliveries, so a crashed claimer re-enters)
--
-- Returns {readycount, totaldiff|false, size|false, claimed, entries}: `readycount` -1 when the chord
-- already finished; `entries` (every entry in score order) only when this call holds the claim, so
-- the member that completes the chord needs no second round trip to read the results.
local jkey, tkey, skey, dkey, gkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, score = ARGV[1], ARGV[2], ARGV[3]
local expires, claim_expires, token = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]

local claim = redis.call('GET', ckey)
if claim == 'done' then
    return {-1, false, false, 0, {}}
end
local member = tid .. ':' .. score
if redis.call('SISMEMBER', dkey, member) == 0 then
    redis.call('ZADD', jkey, score, value)
    redis.call('SADD', dkey, member)
end
local readycount = redis.call('ZCOUNT', jkey, '-inf', '+inf')
if expires > 0 then
    for _, key in ipairs({jkey, tkey, skey, dkey}) do
        redis.call('EXPIRE', key, expires)
    end
    redis.call('EXPIRE', gkey, expires)
end
local totaldiff = redis.call('GET', tkey)
local size = redis.call('GET', skey)
local claimed = 0
if size and readycount == tonumber(size) + tonumber(totaldiff or 0) then
    if claim == token then
        redis.call('EXPIRE', ckey, claim_expires)
        claimed = 1
    elseif not claim then
        redis.call('SET', ckey, token, 'EX', claim_expires)
        claimed = 1
    end
end
if claimed == 1 then
    return {readycount, totaldiff, size, 1, redis.call('ZRANGE', jkey, 0, -1)}
end
return {readycount, totaldiff, size, 0, {}}
