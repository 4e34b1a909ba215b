-- Change a session's row, delete it, or record how many streams one node has
-- open on it: one atomic step on one session's keys (the key layout is in
-- redis.py). Every check runs before the first write. redis_run.lua comes first
-- (meta, name, now, fencing, leases).
--
-- KEYS: meta, events, idempotency keys, presence, inputs, input keys, approvals,
--       messages, message starts, [index of sessions, expiry schedule, index of deadlines]
--       (the last three only outside Redis Cluster: they live in other slots)
-- ARGV: op, session, now (ms), channel, origin (the node writing), then by op:
--   ack       id                        acked_id moves forward only
--   input_ack id                        input_acked_id moves forward only
--   state     state JSON, version ('' any), producer epoch ('' none)
--   lease     producer epoch ('' none), claim (1|0), lease seconds ('' unchanged, 0 none)
--   trim      through
--   delete                              returns 1, or 0 if there was no session
--   expire                              delete if completed and due: 1; 0 stale entry; -1 not due
--   presence  node, count               returns 0 if there is no session
-- Errors are replies 'GW <code> [detail]'.

local events, idem, presence, index, expiring = KEYS[2], KEYS[3], KEYS[4], KEYS[10], KEYS[11]
local op, channel = ARGV[1], ARGV[4]
local origin = table.remove(ARGV, 5)  -- what follows keeps the places the ops below use

if redis.call('EXISTS', meta) == 0 then
  if op == 'expire' and expiring then redis.call('ZREM', expiring, name) end
  if op == 'delete' or op == 'expire' or op == 'presence' then return 0 end
  return redis.error_reply('GW session_not_found')
end

if op == 'expire' then
  local due = redis.call('HGET', meta, 'expires_at')
  if not due then  -- deleted and created again since it was scheduled
    if expiring then redis.call('ZREM', expiring, name) end
    return 0
  end
  if tonumber(due) > tonumber(now) then return -1 end
  op = 'delete'
end

if op == 'delete' then
  redis.call('DEL', meta, events, idem, presence, KEYS[5], KEYS[6], KEYS[7], messages, mspans)
  if index then redis.call('ZREM', index, name) end
  if expiring then redis.call('ZREM', expiring, name) end
  unindex_deadline()
  redis.call('PUBLISH', channel, name .. '\t\t0\tdeleted\t' .. origin)
  return 1
end

if op == 'presence' then
  if tonumber(ARGV[6]) > 0 then
    redis.call('HSET', presence, ARGV[5], ARGV[6])
  else
    redis.call('HDEL', presence, ARGV[5])
    redis.call('HSET', presence, 'last_seen', now)
  end
  return 1
end

if op == 'ack' then
  local row = redis.call('HMGET', meta, 'last_id', 'acked_id')
  local upto = tonumber(ARGV[5])
  if upto < 0 or upto > tonumber(row[1]) then return redis.error_reply('GW invalid_ack ' .. row[1]) end
  if upto > tonumber(row[2]) then redis.call('HSET', meta, 'acked_id', ARGV[5]) end
elseif op == 'input_ack' then
  local row = redis.call('HMGET', meta, 'input_last_id', 'input_acked_id')
  local last, acked, upto = tonumber(row[1] or 0), tonumber(row[2] or 0), tonumber(ARGV[5])
  if upto < 0 or upto > last then return redis.error_reply('GW invalid_input_ack ' .. last) end
  if upto > acked then redis.call('HSET', meta, 'input_acked_id', ARGV[5]) end
elseif op == 'state' then
  local refused = fenced(ARGV[7])
  if refused then return refused end
  local row = redis.call('HMGET', meta, 'state_version', 'last_id')
  if ARGV[6] ~= '' and tonumber(ARGV[6]) ~= tonumber(row[1]) then
    return redis.error_reply('GW state_version_mismatch ' .. row[1])
  end
  redis.call('HSET', meta, 'state', ARGV[5], 'state_version', tonumber(row[1]) + 1, 'state_as_of', row[2])
  adopt(ARGV[7])
  renew()
elseif op == 'lease' then
  local refused = fenced(ARGV[5])
  if refused then return refused end
  local row = redis.call('HMGET', meta, 'status', 'outcome')
  if row[1] == 'completed' then return redis.error_reply('GW session_completed ' .. (row[2] or 'completed')) end
  adopt(ARGV[5])
  if ARGV[6] == '1' then redis.call('HINCRBY', meta, 'producer_epoch', 1) end
  if ARGV[7] == '0' then
    redis.call('HDEL', meta, 'lease_seconds')
  elseif ARGV[7] ~= '' then
    redis.call('HSET', meta, 'lease_seconds', ARGV[7])
  end
  index_deadline(renew())
elseif op == 'trim' then
  local row = redis.call('HMGET', meta, 'last_id', 'trimmed_id')
  local through = keep_whole(math.min(tonumber(ARGV[5]), tonumber(row[1])), tonumber(row[2]))
  if through > tonumber(row[2]) then
    redis.call('HSET', meta, 'trimmed_id', through)
    redis.call('XTRIM', events, 'MINID', string.format('%d-0', through + 1))
  end
else
  return redis.error_reply('GW unknown_op')
end
return redis.call('HGETALL', meta)
