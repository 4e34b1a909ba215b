-- The run's lifecycle on one session's row, as log/base.py has it (apply_producer,
-- renew): redis.py puts this file before each script, so the names below are the
-- scripts' own.
--
-- KEYS[1] is the session's row (meta), KEYS[10] the index of deadlines (absent on
-- Redis Cluster: it lives in another slot); ARGV[2] is the session, ARGV[3] now (ms).

local meta, name, now, deadlines = KEYS[1], ARGV[2], ARGV[3], KEYS[10]

-- Fencing, before any other check: an error reply if the write's producer epoch
-- ('' none) is below the session's, else nil.
local function fenced(producer)
  if producer == '' then return nil end
  local current = redis.call('HGET', meta, 'producer_epoch') or '0'
  if tonumber(producer) < tonumber(current) then
    return redis.error_reply('GW producer_fenced ' .. current .. ' ' .. producer)
  end
end

-- The write passed every check: its producer epoch (not below the session's) becomes the session's.
local function adopt(producer)
  if producer ~= '' then redis.call('HSET', meta, 'producer_epoch', producer) end
end

-- The producer is alive: its lease (if any) runs from now, unless a cancel's grace
-- runs or the run has ended. Returns the new deadline, or false.
local function renew()
  local r = redis.call('HMGET', meta, 'lease_seconds', 'cancel_requested_at', 'status')
  if r[2] or r[3] == 'completed' then return false end
  if not r[1] then
    redis.call('HDEL', meta, 'deadline')
    return false
  end
  local deadline = string.format('%d', tonumber(now) + tonumber(r[1]) * 1000)
  redis.call('HSET', meta, 'deadline', deadline)
  return deadline
end

-- The index of deadlines holds, for every open run with a deadline, a lower bound of
-- it: a write that sets a deadline or may move it earlier indexes it (a renewing
-- append does not: appends stay cheap), and the sweeper re-scores an entry it finds
-- early. An ended or deleted run leaves the index.
local function index_deadline(deadline)
  if deadline and deadlines then redis.call('ZADD', deadlines, deadline, name) end
end

local function unindex_deadline()
  if deadlines then redis.call('ZREM', deadlines, name) end
end
