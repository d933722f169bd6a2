-- mmsend: everything a worker asks the fleet before a Graph call, in one
-- round trip. Every key shares the {prefix} hash tag (one Redis Cluster slot).
--
-- KEYS[1]      ledger hash of the job
-- KEYS[2..5]   gate hashes: app, ad account, page, campaign
-- KEYS[6..9]   probe locks of those gates, same order
-- KEYS[10]     GCRA state of the page
-- KEYS[11]     GCRA state of the whole fleet (global pacing)
-- KEYS[12]     lowered rate of the page (after a page rate limit)
-- KEYS[13]     index of open gates (sorted set, score = expiry)
-- ARGV[1] worker id         ARGV[2] lease ms (request timeout + margin)
-- ARGV[3] page rate /s      ARGV[4] global rate /s (0 = off)
-- ARGV[5] probe wait ms     ARGV[6] probe lock ms
-- ARGV[7] gates on (1/0)    ARGV[8] ledger on (1/0)
-- ARGV[9] ledger retention ms
--
-- Returns one of
--   {'sent', tracking_id, sent_at_ms}          already sent: ack, no call
--   {'busy', worker, remaining_ms}             in flight on another worker
--   {'gated', scope_index, class, code, wait_ms}  held: no claim, no call
--   {'go', maybe_sent, pace_wait_ms}           claimed: call after the wait
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local worker = ARGV[1]

-- 1. the ledger: a job already sent is never called again; a live lease
--    of another worker means the call is in flight elsewhere
local previous = false
if ARGV[8] == '1' then
  local st = redis.call('HMGET', KEYS[1], 'state', 'worker', 'until', 'tracking', 'at')
  if st[1] == 'sent' then
    return {'sent', st[4] or '', st[5] or '0'}
  end
  if st[1] == 'sending' then
    local lease = tonumber(st[3]) or 0
    if st[2] ~= worker and lease > now then
      return {'busy', st[2] or '', tostring(lease - now)}
    end
    -- the holder died (or lost its broker connection) mid-call
    previous = true
  end
end

-- 2. gates: a closed scope holds the job; once its time is up, one job
--    at a time goes through as the probe
if ARGV[7] == '1' then
  for i = 2, 5 do
    local g = redis.call('HMGET', KEYS[i], 'class', 'code', 'until')
    if g[1] then
      local untl = tonumber(g[3]) or 0
      if now < untl then
        return {'gated', tostring(i - 1), g[1], g[2] or '', tostring(untl - now)}
      end
      if not redis.call('SET', KEYS[i + 4], worker, 'NX', 'PX', ARGV[6]) then
        return {'gated', tostring(i - 1), g[1], g[2] or '', ARGV[5]}
      end
    end
  end
end

-- 3. pacing: GCRA with reservation. The job takes the next slot of its page
--    (and of the fleet) and is told how long to wait for it, so a paced job
--    needs no second round trip. Burst: one second's worth.
local function reserve(key, rate)
  if rate <= 0 then return 0 end
  local interval = 1000 / rate
  local tau = (math.max(1, math.floor(rate)) - 1) * interval
  local tat = tonumber(redis.call('GET', key) or '0') or 0
  if tat < now then tat = now end
  local wait = tat - tau - now
  if wait < 0 then wait = 0 end
  local new_tat = tat + interval
  redis.call('SET', key, tostring(new_tat), 'PX', math.ceil(new_tat - now + tau) + 1000)
  return wait
end
local page_rate = tonumber(ARGV[3]) or 0
local lowered = tonumber(redis.call('GET', KEYS[12]) or '')
if lowered and page_rate > 0 and lowered < page_rate then page_rate = lowered end
local wait = math.max(reserve(KEYS[10], page_rate), reserve(KEYS[11], tonumber(ARGV[4]) or 0))
wait = math.ceil(wait)

-- 4. the claim: sending, by this worker, for the wait plus a lease that
--    covers the request timeout
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'sending', 'worker', worker, 'until', now + wait + tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[1], ARGV[9])
end
return {'go', previous and '1' or '0', tostring(wait)}
