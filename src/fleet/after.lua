-- mmsend: everything a worker tells the fleet after a Graph call, for one
-- or more jobs in one round trip, in order. Same keys as before.lua
-- (13 per job; 10 and 11 unused here); job j (from 0) has
-- ARGV[15j + 1 .. 15j + 15]:
--
-- 1  outcome: sent | suspected | release
-- 2  tracking id          3  ledger retention ms
-- 4  worker id            5  ledger on (1/0)
-- 6  gates on (1/0)       7  the call succeeded (1/0)
-- 8  scope index to close (0 = none, 1..4 as keys 2..5)
-- 9  class                10 code label
-- 11 gate wait ms         12 gate key grace ms (probe lock + probe wait)
-- 13 lower the page's rate (1/0)
-- 14 the page's configured rate /s   15 lowered for ms
--
-- Returns 1 for each job told.
-- (prelude.lua in front: `now`, `any_gate`)

local function one(k, a)
  -- 1. the ledger
  if ARGV[a + 5] == '1' then
    if ARGV[a + 1] == 'sent' or ARGV[a + 1] == 'suspected' then
      -- 'until' (the claim's lease) is cleared in the same write
      redis.call('HSET', KEYS[k + 1], 'state', 'sent', 'tracking', ARGV[a + 2], 'at', now,
        'worker', ARGV[a + 4], 'suspected', ARGV[a + 1] == 'suspected' and '1' or '0',
        'until', '0')
      redis.call('PEXPIRE', KEYS[k + 1], ARGV[a + 3])
    else
      -- a retry or a dead letter releases this worker's claim, so the retry
      -- or a replay can send
      local st = redis.call('HMGET', KEYS[k + 1], 'state', 'worker')
      if st[1] == 'sending' and st[2] == ARGV[a + 4] then
        redis.call('DEL', KEYS[k + 1])
      end
    end
  end

  -- 2. gates
  local index = KEYS[k + 13]
  local function open(i)
    redis.call('ZREM', index, KEYS[k + i])
    redis.call('DEL', KEYS[k + i], KEYS[k + i + 4])
    gates_indexed[index] = nil
  end
  if ARGV[a + 6] == '1' then
    if ARGV[a + 7] == '1' then
      if any_gate(index) then
        for i = 2, 5 do open(i) end
      end
    else
      -- a probe's failure settles its gate first; the verdict closes a
      -- scope again below only if it says so
      if any_gate(index) then
        for i = 2, 5 do
          local untl = tonumber(redis.call('HGET', KEYS[k + i], 'until') or '')
          if untl and untl <= now then open(i) end
        end
      end
      local s = tonumber(ARGV[a + 8]) or 0
      if s > 0 then
        local key = KEYS[k + s + 1]
        local wait = tonumber(ARGV[a + 11])
        redis.call('HSET', key, 'class', ARGV[a + 9], 'code', ARGV[a + 10], 'until', now + wait)
        redis.call('PEXPIRE', key, wait + tonumber(ARGV[a + 12]))
        redis.call('ZADD', index, now + wait + tonumber(ARGV[a + 12]), key)
        gates_indexed[index] = nil
      end
    end
  end

  -- 3. a page rate limit halves the page's rate, fleet-wide, for a while
  if ARGV[a + 13] == '1' then
    local current = tonumber(redis.call('GET', KEYS[k + 12]) or ARGV[a + 14]) or 1
    local lowered = math.max(1, math.floor(current / 2))
    redis.call('SET', KEYS[k + 12], tostring(lowered), 'PX', ARGV[a + 15])
  end
end

local out = {}
for j = 0, #KEYS / 13 - 1 do
  one(13 * j, 15 * j)
  out[j + 1] = 1
end
return out
