-- mmsend: everything a worker tells the fleet after a Graph call, in one
-- round trip. Same keys as before.lua (KEYS[10], KEYS[11] unused here).
--
-- ARGV[1]  outcome: sent | suspected | release
-- ARGV[2]  tracking id          ARGV[3] ledger retention ms
-- ARGV[4]  worker id            ARGV[5] ledger on (1/0)
-- ARGV[6]  gates on (1/0)       ARGV[7] the call succeeded (1/0)
-- ARGV[8]  scope index to close (0 = none, 1..4 as KEYS[2..5])
-- ARGV[9]  class                ARGV[10] code label
-- ARGV[11] gate wait ms         ARGV[12] gate key grace ms (probe lock + probe wait)
-- ARGV[13] lower the page's rate (1/0)
-- ARGV[14] the page's configured rate /s   ARGV[15] lowered for ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- 1. the ledger
if ARGV[5] == '1' then
  if ARGV[1] == 'sent' or ARGV[1] == 'suspected' then
    redis.call('HSET', KEYS[1], 'state', 'sent', 'tracking', ARGV[2], 'at', now,
      'worker', ARGV[4], 'suspected', ARGV[1] == 'suspected' and '1' or '0')
    redis.call('HDEL', KEYS[1], 'until')
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
  else
    -- a retry or a dead letter releases this worker's claim, so the retry
    -- or a replay can send
    local st = redis.call('HMGET', KEYS[1], 'state', 'worker')
    if st[1] == 'sending' and st[2] == ARGV[4] then
      redis.call('DEL', KEYS[1])
    end
  end
end

-- 2. gates
local function open(i)
  redis.call('ZREM', KEYS[13], KEYS[i])
  redis.call('DEL', KEYS[i], KEYS[i + 4])
end
if ARGV[6] == '1' then
  if ARGV[7] == '1' then
    for i = 2, 5 do open(i) end
  else
    -- a probe's failure settles its gate first; the verdict closes a scope
    -- again below only if it says so
    for i = 2, 5 do
      local untl = tonumber(redis.call('HGET', KEYS[i], 'until') or '')
      if untl and untl <= now then open(i) end
    end
    local s = tonumber(ARGV[8]) or 0
    if s > 0 then
      local key = KEYS[s + 1]
      local wait = tonumber(ARGV[11])
      redis.call('HSET', key, 'class', ARGV[9], 'code', ARGV[10], 'until', now + wait)
      redis.call('PEXPIRE', key, wait + tonumber(ARGV[12]))
      redis.call('ZADD', KEYS[13], now + wait + tonumber(ARGV[12]), key)
    end
  end
end

-- 3. a page rate limit halves the page's rate, fleet-wide, for a while
if ARGV[13] == '1' then
  local current = tonumber(redis.call('GET', KEYS[12]) or ARGV[14]) or 1
  local lowered = math.max(1, math.floor(current / 2))
  redis.call('SET', KEYS[12], tostring(lowered), 'PX', ARGV[15])
end
return 1
