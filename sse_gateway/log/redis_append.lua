-- Create a session, append events to it, or end its run: one atomic step on one
-- session's keys (the key layout is in redis.py). Every check runs before the
-- first write, so an error reply leaves the session as it was. redis_run.lua
-- comes first (meta, name, now, fencing, leases).
--
-- KEYS: meta, events, idempotency keys, presence, inputs, input keys, approvals,
--       messages, message starts, [index of sessions, expiry schedule, index of deadlines]
--       (the last three only outside Redis Cluster: they live in other slots)
-- ARGV: op, session, now (ms), channel, origin (the node writing), then by op:
--   create    epoch, metadata JSON ('' none), ttl seconds ('' none), lease seconds ('' none),
--             webhook URL ('' none)
--   append    epoch (if created), create (1|0), max events (0: no limit), producer epoch ('' none),
--             lease seconds if created ('' none), the number N of message operations, then 3 per
--             operation: the index of its event (from 1), its type, its message id; then 4 per
--             event: type, data, is JSON (1|0), idempotency key ('' none)
--   complete  end event data, default ttl seconds ('' none), outcome, error JSON ('' none),
--             result JSON, producer epoch ('' none)
--   overdue   as complete, but for the producer epoch: the time the run is due by (ms), and the
--             lease seconds ('' none) the outcome and error were chosen for
-- append replies epoch, status, created_at, last_id, trimmed_id, created (1|0), deadline ('' none),
-- then 2 per event: its id, new (1|0).
-- complete and overdue reply 1 (the run ended now) or 0 (it had already, or is not due;
-- overdue: -1 if it would end otherwise than the caller chose), the number of messages the
-- end closed and their ids (each got a message.end before gateway.end), then the row.
-- Errors are replies 'GW <code> [detail]'.

local events, idem, approvals, index, expiring = KEYS[2], KEYS[3], KEYS[7], KEYS[10], KEYS[11]
local op, channel = ARGV[1], ARGV[4]
local origin = table.remove(ARGV, 5)  -- what follows keeps the places the ops below use

local function publish(epoch, last_id, status)
  redis.call('PUBLISH', channel, name .. '\t' .. epoch .. '\t' .. last_id .. '\t' .. status .. '\t' .. origin)
end

local function create(epoch, lease, webhook)
  redis.call('HSET', meta, 'epoch', epoch, 'created_at', now, 'status', 'open', 'last_id', 0, 'trimmed_id', 0,
             'acked_id', 0, 'state_version', 0, 'state_as_of', 0)
  if lease ~= '' then redis.call('HSET', meta, 'lease_seconds', lease) end
  if webhook ~= '' then redis.call('HSET', meta, 'webhook_url', webhook) end
  index_deadline(renew())
  if index then redis.call('ZADD', index, now, name) end
end

local function with_row(code, closed)
  local reply = redis.call('HGETALL', meta)
  closed = closed or {}
  for i = #closed, 1, -1 do table.insert(reply, 1, closed[i]) end
  table.insert(reply, 1, #closed)
  table.insert(reply, 1, code)
  return reply
end

local exists = redis.call('EXISTS', meta) == 1

if op == 'create' then
  if exists then return redis.error_reply('GW session_exists') end
  create(ARGV[5], ARGV[8], ARGV[9])
  if ARGV[6] ~= '' then redis.call('HSET', meta, 'metadata', ARGV[6]) end
  if ARGV[7] ~= '' then redis.call('HSET', meta, 'ttl_seconds', ARGV[7]) end
  return redis.call('HGETALL', meta)
end

if op == 'append' then
  local producer, created = ARGV[8], 0
  if not exists and ARGV[6] ~= '1' then return redis.error_reply('GW session_not_found') end
  local refused = fenced(producer)
  if refused then return refused end
  if not exists then
    create(ARGV[5], ARGV[9], '')
    created = 1
  end
  local row = redis.call('HMGET', meta, 'epoch', 'status', 'created_at', 'last_id', 'trimmed_id')
  local last_id, trimmed = tonumber(row[4]), tonumber(row[5])
  local n_ops = tonumber(ARGV[10])
  local first = 11 + 3 * n_ops  -- the first event's arguments
  local known, fresh = {}, 0
  for i = first, #ARGV, 4 do
    if ARGV[i + 3] ~= '' then known[i] = redis.call('HGET', idem, ARGV[i + 3]) end
    if not known[i] then fresh = fresh + 1 end
  end
  -- A retry of an event already stored still learns its id; anything new is refused.
  if fresh > 0 and row[2] == 'completed' then return redis.error_reply('GW session_completed') end
  -- Message operations (messages.check), on the ids their events will get: all checked before any write.
  local changed, read = {}, {}
  if n_ops > 0 then
    local will, seen, id = {}, {}, last_id
    for i = first, #ARGV, 4 do
      local key = ARGV[i + 3]
      if not known[i] and not (key ~= '' and seen[key]) then
        id = id + 1
        will[(i - first) / 4 + 1] = id
        if key ~= '' then seen[key] = true end
      end
    end
    for j = 11, first - 1, 3 do
      local at, op, mid = will[tonumber(ARGV[j])], ARGV[j + 1], ARGV[j + 2]
      if at then
        if read[mid] == nil then read[mid] = redis.call('HGET', messages, mid) end
        local state = changed[mid] or read[mid]
        if op == 'message.start' then
          if state then return redis.error_reply('GW message_exists ' .. mid .. ' ' .. string.match(state, '^%d+')) end
          changed[mid] = at .. ':0'
        else
          if not state then return redis.error_reply('GW message_not_found ' .. mid) end
          local start, closed = string.match(state, '^(%d+):(%d+)$')
          if op == 'message.replace' then
            if closed == '0' then changed[mid] = start .. ':' .. at end
          elseif closed ~= '0' then
            return redis.error_reply('GW message_closed ' .. mid .. ' ' .. closed)
          elseif op == 'message.end' then
            changed[mid] = start .. ':' .. at
          end
        end
      end
    end
  end
  for mid, state in pairs(changed) do
    redis.call('HSET', messages, mid, state)
    redis.call('ZADD', mspans, string.match(state, '^%d+'), mid)
  end
  local out, batch, added = {row[1], row[2], row[3], 0, 0, created, ''}, {}, 0
  for i = first, #ARGV, 4 do
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
      trimmed = keep_whole(last_id - max_events, trimmed)
      redis.call('XTRIM', events, 'MINID', string.format('%d-0', trimmed + 1))
    end
    redis.call('HSET', meta, 'last_id', last_id, 'trimmed_id', trimmed)
    publish(row[1], last_id, 'open')
  end
  adopt(producer)
  out[4], out[5], out[7] = last_id, trimmed, renew() or ''
  return out
end

if op == 'complete' or op == 'overdue' then
  if not exists then
    if op == 'complete' then return redis.error_reply('GW session_not_found') end
    unindex_deadline()
    return with_row(0)
  end
  local row = redis.call('HMGET', meta, 'epoch', 'status', 'ttl_seconds', 'outcome', 'deadline',
                         'cancel_requested_at', 'lease_seconds')
  local outcome = ARGV[7]
  if op == 'complete' then
    local refused = fenced(ARGV[10])
    if refused then return refused end
    if row[2] == 'completed' then  -- the same end again changes nothing (redis.py compares the result)
      local ended = row[4] or 'completed'  -- a run ended before outcomes were kept completed
      if outcome ~= ended then return redis.error_reply('GW session_completed ' .. ended) end
      return with_row(0)
    end
    adopt(ARGV[10])
  else  -- the sweeper's: end the run only if it is due, checked here, atomically with the end
    if row[2] == 'completed' or not row[5] then
      unindex_deadline()
      return with_row(0)
    end
    if tonumber(row[5]) > tonumber(ARGV[10]) then  -- renewed since it was indexed
      index_deadline(row[5])
      return with_row(0)
    end
    local ends_as = row[6] and 'cancelled' or 'timed_out'  -- as base.expiry: a cancel was asked for, or not
    if outcome ~= ends_as or (ends_as == 'timed_out' and (row[7] or '') ~= ARGV[11]) then return with_row(-1) end
  end
  -- Each message still open gets its message.end first (messages.close_data).
  local closed = {}
  local status = outcome == 'completed' and 'finished' or 'failed'
  for _, mid in ipairs(redis.call('ZRANGE', mspans, 0, -1)) do
    local start, done = string.match(redis.call('HGET', messages, mid), '^(%d+):(%d+)$')
    if done == '0' then
      local id = redis.call('HINCRBY', meta, 'last_id', 1)
      redis.call('XADD', events, string.format('%d-0', id), 'e', 'message.end',
                 'd', '{"message":"' .. mid .. '","status":"' .. status .. '"}', 'j', 1, 't', now)
      redis.call('HSET', messages, mid, start .. ':' .. id)
      closed[#closed + 1] = mid
    end
  end
  local last_id = redis.call('HINCRBY', meta, 'last_id', 1)
  redis.call('HSET', meta, 'status', 'completed', 'completed_at', now, 'outcome', outcome, 'result', ARGV[9])
  if ARGV[8] ~= '' then redis.call('HSET', meta, 'error', ARGV[8]) end
  redis.call('HDEL', meta, 'deadline')
  unindex_deadline()
  redis.call('XADD', events, string.format('%d-0', last_id), 'e', 'gateway.end', 'd', ARGV[5], 'j', 1, 't', now)
  local ttl = tonumber(row[3] or ARGV[6])
  if ttl then
    local due = string.format('%d', tonumber(now) + ttl * 1000)
    redis.call('HSET', meta, 'expires_at', due)
    if expiring then redis.call('ZADD', expiring, due, name) end
  end
  publish(row[1], last_id, 'completed')
  return with_row(1, closed)
end

return redis.error_reply('GW unknown_op')
