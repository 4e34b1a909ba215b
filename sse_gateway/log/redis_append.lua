-- Create a session, append events to it, or complete it: one atomic step on one
-- session's keys (the key layout is in redis.py). Every check runs before the
-- first write, so an error reply leaves the session as it was.
--
-- KEYS: meta, events, idempotency keys, presence, inputs, input keys, approvals,
--       [index of sessions, expiry schedule]
--       (the last two only outside Redis Cluster: they live in other slots)
-- ARGV: op, session, now (ms), channel, origin (the node writing), then by op:
--   create    epoch, metadata JSON ('' none), ttl seconds ('' none)
--   append    epoch (if created), create (1|0), max events (0: no limit),
--             then 4 per event: type, data, is JSON (1|0), idempotency key ('' none)
--   complete  result JSON, default ttl seconds ('' none)
-- Errors are replies 'GW <code>'.

local meta, events, idem, approvals, index, expiring = KEYS[1], KEYS[2], KEYS[3], KEYS[7], KEYS[8], KEYS[9]
local op, name, now, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local origin = table.remove(ARGV, 5)  -- what follows keeps the places the ops below use

local function publish(epoch, last_id, status)
  redis.call('PUBLISH', channel, name .. '\t' .. epoch .. '\t' .. last_id .. '\t' .. status .. '\t' .. origin)
end

local function create(epoch)
  redis.call('HSET', meta, 'epoch', epoch, 'created_at', now, 'status', 'open', 'last_id', 0, 'trimmed_id', 0,
             'acked_id', 0, 'state_version', 0, 'state_as_of', 0)
  if index then redis.call('ZADD', index, now, name) end
end

local exists = redis.call('EXISTS', meta) == 1

if op == 'create' then
  if exists then return redis.error_reply('GW session_exists') end
  create(ARGV[5])
  if ARGV[6] ~= '' then redis.call('HSET', meta, 'metadata', ARGV[6]) end
  if ARGV[7] ~= '' then redis.call('HSET', meta, 'ttl_seconds', ARGV[7]) end
  return redis.call('HGETALL', meta)
end

if op == 'append' then
  local created = 0
  if not exists then
    if ARGV[6] ~= '1' then return redis.error_reply('GW session_not_found') end
    create(ARGV[5])
    created = 1
  end
  local row = redis.call('HMGET', meta, 'epoch', 'status', 'created_at', 'last_id', 'trimmed_id')
  local last_id, trimmed = tonumber(row[4]), tonumber(row[5])
  local known, fresh = {}, 0
  for i = 8, #ARGV, 4 do
    if ARGV[i + 3] ~= '' then known[i] = redis.call('HGET', idem, ARGV[i + 3]) end
    if not known[i] then fresh = fresh + 1 end
  end
  -- A retry of an event already stored still learns its id; anything new is refused.
  if fresh > 0 and row[2] == 'completed' then return redis.error_reply('GW session_completed') end
  local out, batch, added = {row[1], row[2], row[3], 0, 0, created}, {}, 0
  for i = 8, #ARGV, 4 do
    local key = ARGV[i + 3]
    local id = known[i] or (key ~= '' and batch[key])
    if id then
      out[#out + 1] = tonumber(id)
      out[#out + 1] = 0
    else
      last_id = last_id + 1
      redis.call('XADD', events, string.format('%d-0', last_id), 'e', ARGV[i], 'd', ARGV[i + 1], 'j', ARGV[i + 2],
                 't', now)
      if key ~= '' then
        batch[key] = last_id
        redis.call('HSET', idem, key, last_id)
      end
      if ARGV[i] == 'approval.request' and ARGV[i + 2] == '1' then
        -- opens an approval (log/base.py, approval_ids): an object with a string approval_id of 1-128
        -- printable ASCII characters; an id already known keeps its state
        local ok, doc = pcall(cjson.decode, ARGV[i + 1])
        if ok and type(doc) == 'table' and type(doc.approval_id) == 'string' and #doc.approval_id <= 128
            and string.find(doc.approval_id, '^[%w%p ]+$') then
          redis.call('HSETNX', approvals, doc.approval_id, 0)
        end
      end
      out[#out + 1] = last_id
      out[#out + 1] = 1
      added = added + 1
    end
  end
  if added > 0 then
    local max_events = tonumber(ARGV[7])
    if max_events > 0 and last_id - trimmed > max_events then
      trimmed = last_id - max_events
      redis.call('XTRIM', events, 'MINID', string.format('%d-0', trimmed + 1))
    end
    redis.call('HSET', meta, 'last_id', last_id, 'trimmed_id', trimmed)
    publish(row[1], last_id, 'open')
  end
  out[4], out[5] = last_id, trimmed
  return out
end

if op == 'complete' then
  if not exists then return redis.error_reply('GW session_not_found') end
  local row = redis.call('HMGET', meta, 'epoch', 'status', 'ttl_seconds')
  local added = 0
  if row[2] ~= 'completed' then
    local last_id = redis.call('HINCRBY', meta, 'last_id', 1)
    redis.call('HSET', meta, 'status', 'completed', 'completed_at', now, 'result', ARGV[5])
    redis.call('XADD', events, string.format('%d-0', last_id), 'e', 'gateway.end', 'd', ARGV[5], 'j', 1, 't', now)
    local ttl = tonumber(row[3] or ARGV[6])
    if ttl then
      local due = string.format('%d', tonumber(now) + ttl * 1000)
      redis.call('HSET', meta, 'expires_at', due)
      if expiring then redis.call('ZADD', expiring, due, name) end
    end
    publish(row[1], last_id, 'completed')
    added = 1
  end
  local reply = redis.call('HGETALL', meta)
  table.insert(reply, 1, added)
  return reply
end

return redis.error_reply('GW unknown_op')
