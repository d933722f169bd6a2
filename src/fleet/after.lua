-- mmsend: everything a worker tells the fleet after a Graph call, for one
-- or more jobs in one round trip, in order. The call's layout is in
-- prelude.lua (each_job); the scope keys are before.lua's (9 and 10 unused
-- here). Per job:
--
-- shared args 1 ledger retention ms   2 worker id
--             3 ledger on (1/0)       4 gates on (1/0)
--             5 gate key grace ms (probe lock + probe wait)
--             6 the page's configured rate /s   7 lowered for ms
--             8 halve at most once per this many ms
--             9 index tracking ids for delivery tracking: 1 on, 0 off,
--               2 auto (once the fleet saw an echo: `tag:wh:page_echo`)
-- own args, the common answer (a send, nothing to close or lower):
--             1 'ok'                  2 tracking id      3 digest
-- or else     1 outcome: sent | suspected | release
--             2 tracking id           3 the call succeeded (1/0)
--             4 scope index to close (0 = none, 1..4 as scope keys 1..4)
--             5 class                 6 code label
--             7 gate wait ms          8 lower the page's rate (1/0)
--             9 digest
--
-- Returns 1 for each job told.
-- (prelude.lua in front: `now`, `now_text`, `each_job`, `any_gate`,
-- `a_hash`, `read_record`)

-- the day (of Redis's clock) whose hash a send's tracking id goes to, and
-- the day hashes whose expiry this call set already
local tid_day = string.format('%d', math.floor(now / 86400000))
local tid_expiring = {}

-- whether sends are indexed for the delivery tracker: `mode` 1 on, 0 off,
-- 2 auto: once the fleet saw an echo (looked up once a call)
local echoes_seen = nil
local function indexing(tag, mode)
  if mode == '1' then return true end
  if mode ~= '2' then return false end
  if echoes_seen == nil then
    echoes_seen = redis.call('EXISTS', tag .. ':wh:page_echo') == 1
  end
  return echoes_seen
end

local function own(first)
  if first == 'ok' then return 3 end
  return 9
end

local function one(ledger, k, o, a)
  local ok = ARGV[o + 1] == 'ok'
  local digest = ok and ARGV[o + 3] or ARGV[o + 9]
  -- 1. the ledger
  if ARGV[a + 3] == '1' then
    local outcome = ok and 'sent' or ARGV[o + 1]
    if outcome == 'sent' or outcome == 'suspected' then
      -- over a claim of this version (or any string record) the key keeps
      -- the expiry the claim set; a lost key, or an earlier build's hash,
      -- is written again with the retention
      local record = 'sent\n' .. now_text .. '\n' .. (outcome == 'suspected' and '1' or '0')
        .. '\n' .. ARGV[a + 2] .. '\n' .. ARGV[o + 2] .. '\n' .. digest
      local value = redis.pcall('SET', ledger, record, 'XX', 'KEEPTTL', 'GET')
      if not value or a_hash(value) then
        redis.call('SET', ledger, record, 'PX', ARGV[a + 1])
      end
      -- the delivery tracker's join (src/fleet/track.lua): tracking id →
      -- job and campaign, in one hash per day of Redis's clock
      -- (`tag:tid:<day>`, a field per send: half the work of a key per send,
      -- and far less memory), kept for the ledger retention after the day's
      -- last send (its expiry set once a call). The key is built from the
      -- ledger key's hash tag (same slot); the value is
      -- '<bytes of the job id>:<job id><campaign>'
      local tracking = ARGV[o + 2]
      local close = tracking ~= '' and string.find(ledger, '}', 1, true)
      local tag = close and string.sub(ledger, 1, close)
      if close and indexing(tag, ARGV[a + 9]) then
        local job = string.sub(ledger, close + 6)
        local campaign = string.sub(KEYS[k + 13], close + 11)
        local bucket = tag .. ':tid:' .. tid_day
        redis.call('HSET', bucket, tracking, #job .. ':' .. job .. campaign)
        if not tid_expiring[bucket] then
          redis.call('PEXPIRE', bucket, tonumber(ARGV[a + 1]) + 86400000)
          tid_expiring[bucket] = true
        end
      end
    else
      -- a retry or a dead letter releases this worker's claim, so the retry
      -- or a replay can send
      local state, holder = read_record(ledger, redis.pcall('GET', ledger))
      if state == 'sending' and holder == ARGV[a + 2] then
        redis.call('DEL', ledger)
      end
    end
  end

  -- 2. gates
  local index = KEYS[k + 12]
  local function open(i)
    redis.call('ZREM', index, KEYS[k + i])
    redis.call('DEL', KEYS[k + i], KEYS[k + i + 4])
    gates_indexed[index] = nil
  end
  if ARGV[a + 4] == '1' then
    if ok or ARGV[o + 3] == '1' then
      if any_gate(index) then
        for i = 1, 4 do open(i) end
      end
    else
      -- a probe's failure settles its gate first; the verdict closes a
      -- scope again below only if it says so
      if any_gate(index) then
        for i = 1, 4 do
          local untl = tonumber(redis.call('HGET', KEYS[k + i], 'until') or '')
          if untl and untl <= now then open(i) end
        end
      end
      local s = tonumber(ARGV[o + 4]) or 0
      if s > 0 then
        local key = KEYS[k + s]
        local wait = tonumber(ARGV[o + 7])
        redis.call('HSET', key, 'class', ARGV[o + 5], 'code', ARGV[o + 6], 'until', now + wait,
          'at', now_text)
        redis.call('PEXPIRE', key, wait + tonumber(ARGV[a + 5]))
        redis.call('ZADD', index, now + wait + tonumber(ARGV[a + 5]), key)
        gates_indexed[index] = nil
      end
    end
  end

  -- 3. a page rate limit halves the page's rate, fleet-wide, for a while;
  --    at most once per window: the calls in flight when the limit hit
  --    answer it together, and one burst is one halving (the key was set
  --    `lowered for` ago minus its time to live)
  if not ok and ARGV[o + 8] == '1' then
    local key = KEYS[k + 11]
    local lowered_for = tonumber(ARGV[a + 7])
    local left = redis.call('PTTL', key)
    if left < 0 or lowered_for - left >= tonumber(ARGV[a + 8]) then
      local current = tonumber(redis.call('GET', key) or ARGV[a + 6]) or 1
      local lowered = math.max(1, math.floor(current / 2))
      redis.call('SET', key, tostring(lowered), 'PX', lowered_for)
    end
  end
  return 1
end

return each_job(own, 9, one)
