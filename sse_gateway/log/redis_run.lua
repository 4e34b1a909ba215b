-- The run's lifecycle on one session's row, as log/base.py has it (apply_producer,
-- renew): redis.py puts this file before each script, so the names below are the
-- scripts' own.
--
-- KEYS[1] is the session's row (meta), KEYS[8] and KEYS[9] its messages (hash: id ->
-- 'START:CLOSED', CLOSED 0 while open) and the index of their starts (sorted set of
-- the messages not wholly trimmed, by start), KEYS[12] the index of deadlines (absent
-- on Redis Cluster: it lives in another slot); ARGV[2] is the session, ARGV[3] now (ms).

local meta, name, now, deadlines = KEYS[1], ARGV[2], ARGV[3], KEYS[12]
local messages, mspans = KEYS[8], KEYS[9]

-- Where retention that asks to remove up to 'through' stops (messages.keep_whole):
-- never into a message (one open, or closed after the point, keeps everything from
-- its start). Messages wholly trimmed leave the index of starts.
local function keep_whole(through, trimmed)
  while through > trimmed do
    local low = nil
    for _, mid in ipairs(redis.call('ZRANGEBYSCORE', mspans, '(' .. trimmed, through)) do
      local start, closed = string.match(redis.call('HGET', messages, mid), '^(%d+):(%d+)$')
      start, closed = tonumber(start), tonumber(closed)
      if (closed == 0 or closed > through) and (not low or start < low) then low = start end
    end
    if not low then break end
    through = low - 1
  end
  if through > trimmed then redis.call('ZREMRANGEBYSCORE', mspans, '-inf', through) end
  return math.max(through, trimmed)
end

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
