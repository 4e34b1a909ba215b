-- Store one input of a session (user -> agent) and append its mirror event
-- (gateway.input) to the session's output: one atomic step on one session's keys
-- (the key layout is in redis.py). Every check runs before the first write, so
-- an error reply leaves the session as it was. redis_run.lua comes first (meta,
-- name, now, leases).
--
-- KEYS: meta, events, idempotency keys, presence, inputs, input keys, approvals, messages, message starts,
--       [index of sessions, expiry schedule, index of deadlines]
-- ARGV: op ('input'), session, now (ms), channel, origin (the node writing), then
--       kind, data JSON, idempotency key ('' none), approval id ('' none), decision ('' none),
--       the mirror's JSON after its leading '{"input_id":N,' (models.mirror_tail), max events (0: no limit),
--       cancel grace seconds ('' none: a cancel does not move the deadline)
-- Reply: new (1|0), then the input (id, kind, data, ts, event_id, approval_id, decision; '' for none),
--        then the row (epoch, status, last_id, trimmed_id, input_last_id, input_acked_id, deadline ('' none)).
-- Errors are replies 'GW <code> [detail]'.

local events, inputs, ikeys, approvals = KEYS[2], KEYS[5], KEYS[6], KEYS[7]
local channel, origin = ARGV[4], ARGV[5]
local kind, data, key, approval_id, decision, tail = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local max_events, grace = tonumber(ARGV[12]), ARGV[13]

if ARGV[1] ~= 'input' then return redis.error_reply('GW unknown_op') end
if redis.call('EXISTS', meta) == 0 then return redis.error_reply('GW session_not_found') end

local function row()
  local r = redis.call('HMGET', meta, 'epoch', 'status', 'last_id', 'trimmed_id', 'input_last_id', 'input_acked_id',
                      'deadline')
  return {r[1], r[2], tonumber(r[3]), tonumber(r[4]), tonumber(r[5] or 0), tonumber(r[6] or 0), r[7] or ''}
end

local function input_reply(new, id)
  local found = redis.call('XRANGE', inputs, id .. '-0', id .. '-0')
  local f = {}
  local flat = found[1][2]
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  local out = {new, tonumber(id), f.k, f.d, tonumber(f.t), tonumber(f.e), f.a or '', f.c or ''}
  for _, v in ipairs(row()) do out[#out + 1] = v end
  return out
end

if key ~= '' then
  local seen = redis.call('HGET', ikeys, key)
  if seen then return input_reply(0, seen) end  -- a repeat learns the input it repeats, completed or not
end
local r = row()
if r[2] == 'completed' then return redis.error_reply('GW session_completed') end
if kind == 'approval' then
  local state = redis.call('HGET', approvals, approval_id)
  if not state then return redis.error_reply('GW approval_not_found') end
  if tonumber(state) ~= 0 then return redis.error_reply('GW approval_answered ' .. state) end
end

local input_id, last_id, trimmed = r[5] + 1, r[3] + 1, r[4]
redis.call('XADD', events, string.format('%d-0', last_id), 'e', 'gateway.input',
           'd', '{"input_id":' .. input_id .. ',' .. tail, 'j', 1, 't', now)
if max_events > 0 and last_id - trimmed > max_events then
  trimmed = keep_whole(last_id - max_events, tonumber(trimmed))
  redis.call('XTRIM', events, 'MINID', string.format('%d-0', trimmed + 1))
end
local fields = {'k', kind, 'd', data, 't', now, 'e', last_id}
if approval_id ~= '' then
  fields[#fields + 1] = 'a'
  fields[#fields + 1] = approval_id
  fields[#fields + 1] = 'c'
  fields[#fields + 1] = decision
  redis.call('HSET', approvals, approval_id, input_id)
end
redis.call('XADD', inputs, string.format('%d-0', input_id), unpack(fields))
if kind == 'cancel' and not redis.call('HGET', meta, 'cancel_requested_at') then
  -- the first cancel: renewals stop, and the grace (if any) pulls the deadline in
  redis.call('HSET', meta, 'cancel_requested_at', now)
  if grace ~= '' then
    local deadline, stop = redis.call('HGET', meta, 'deadline'), tonumber(now) + tonumber(grace) * 1000
    if not deadline or stop < tonumber(deadline) then
      deadline = string.format('%d', stop)
      redis.call('HSET', meta, 'deadline', deadline)
      index_deadline(deadline)
    end
  end
end
if key ~= '' then redis.call('HSET', ikeys, key, input_id) end
redis.call('HSET', meta, 'last_id', last_id, 'trimmed_id', trimmed, 'input_last_id', input_id)
redis.call('PUBLISH', channel, name .. '\t' .. r[1] .. '\t' .. last_id .. '\topen\t' .. origin .. '\t' .. input_id)
return input_reply(1, input_id)
