-- fetch.lua: pop up to N messages and record them as unacked, in one atomic step (kombu's ack
-- emulation: a consumer killed at any instant loses nothing, the message is either still in its
-- list or recorded in `unacked`, where a restore sweep finds it).
--
-- KEYS[1]  unacked          (hash  delivery_tag -> [envelope, exchange, routing_key])
-- KEYS[2]  unacked_index    (zset  delivery_tag scored by delivery time)
-- KEYS[3..] five keys per queue, queues in the consumer's current order: the lists of priority
--           steps 0, 3, 6, 9, then the queue's dead-letter list.
-- ARGV[1]  now, unix seconds as a decimal (the unacked_index score), or '' to use the server's
--          clock (a fetch queued behind a blocking wait runs at an unknown later time)
-- ARGV[2]  N, the most messages to pop
-- ARGV[3]  the most messages a dead-letter list keeps (the newest; `max_dead_letters`)
-- ARGV[4..] the queue names, in the same order (routing key for envelopes without delivery_info)
--
-- Lists are popped priority-major (every queue's step 0 before any queue's step 3, ...), RPOP from
-- the right as producers LPUSH on the left. The envelope is never re-encoded: cjson only reads the
-- delivery tag, exchange and routing key, and the record is built by string concatenation.
-- An envelope that is not a JSON object with a string `properties.delivery_tag`, or whose tag is
-- already unacked (another message's: a producer that reuses tags), goes to its queue's
-- dead-letter list instead (LPUSH, then LTRIM to ARGV[3]) and is reported, so nothing is lost
-- silently (only the oldest dead letters, past the bound).
--
-- Redis work per message is kept to the pop and the records: each RPOP's batch is checked against
-- `unacked` with one HMGET, and the records of the whole call go in with one HSET and one ZADD at
-- the end (a call that pops 64 messages makes a handful of redis.call()s, not 4 × 64).
--
-- Returns a flat array: the score used, then four items per popped message:
--   kind (1 = recorded as unacked, 0 = dead-lettered as unreadable, 2 = dead-lettered as a duplicate
--   tag), queue position (1-based), delivery tag ("" when unreadable), envelope.
local nqueues = #ARGV - 3
local want = tonumber(ARGV[2])
local keep = tonumber(ARGV[3])
local score = ARGV[1]
if score == '' then
  local t = redis.call('TIME')
  score = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
local out = {score}
local got = 0
-- The records of this call (HSET field/value pairs, ZADD score/member pairs), written at the end,
-- and the tags they use (a second message with one of them in this call is a duplicate too).
local records, scored, taken = {}, {}, {}

-- Writes the records in chunks (unpack() has a limit on how many values it spreads).
local function flush()
  for i = 1, #records, 1000 do
    redis.call('HSET', KEYS[1], unpack(records, i, math.min(i + 999, #records)))
    redis.call('ZADD', KEYS[2], unpack(scored, i, math.min(i + 999, #scored)))
  end
  return out
end

-- The delivery tag, exchange and routing key of an envelope; tag is nil if unreadable.
local function read(item)
  local ok, env = pcall(cjson.decode, item)
  if not (ok and type(env) == 'table' and type(env['properties']) == 'table') then
    return nil
  end
  local props = env['properties']
  local tag = props['delivery_tag']
  if type(tag) ~= 'string' or tag == '' then
    return nil
  end
  local info = props['delivery_info']
  if type(info) == 'table' then
    return tag, info['exchange'], info['routing_key']
  end
  return tag
end

for step = 1, 4 do
  for q = 1, nqueues do
    if got >= want then return flush() end
    local base = 2 + (q - 1) * 5
    local items = redis.call('RPOP', KEYS[base + step], want - got)
    if items then
      local tags, exs, rks = {}, {}, {}
      local readable = {}
      for i, item in ipairs(items) do
        tags[i], exs[i], rks[i] = read(item)
        if tags[i] then readable[#readable + 1] = tags[i] end
      end
      -- Which tags already belong to an unacked message, in one call.
      local held = {}
      if #readable > 0 then
        local found = redis.call('HMGET', KEYS[1], unpack(readable))
        for i, tag in ipairs(readable) do
          if found[i] then held[tag] = true end
        end
      end
      for i, item in ipairs(items) do
        got = got + 1
        local tag, ex, rk = tags[i], exs[i], rks[i]
        -- A tag already in `unacked` belongs to another message: recording this one would
        -- overwrite that record, and the first settle of either would drop both.
        local dup = tag ~= nil and (held[tag] or taken[tag])
        if tag ~= nil and not dup then
          if type(ex) ~= 'string' then ex = '' end
          if type(rk) ~= 'string' then rk = ARGV[3 + q] end
          taken[tag] = true
          records[#records + 1] = tag
          records[#records + 1] = '[' .. item .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']'
          scored[#scored + 1] = score
          scored[#scored + 1] = tag
          out[#out + 1] = 1
          out[#out + 1] = q
          out[#out + 1] = tag
        else
          redis.call('LPUSH', KEYS[base + 5], item)
          redis.call('LTRIM', KEYS[base + 5], 0, keep - 1)
          if dup then
            out[#out + 1] = 2
            out[#out + 1] = q
            out[#out + 1] = tag
          else
            out[#out + 1] = 0
            out[#out + 1] = q
            out[#out + 1] = ''
          end
        end
        out[#out + 1] = item
      end
    end
  end
end
return flush()
