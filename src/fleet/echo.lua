-- mmsend: evidence for a maybe-sent job (src/fleet/track.rs): an echo Meta
-- sent for the job's token and message id since `since` whose
-- tracking id no job recorded as its send. The job's claim is renewed in
-- the same call, so a job that waits for its echo keeps its lease.
--
-- KEYS 1 the job's ledger key   2 tag:wh:sends:<send key> (track.lua)
--      3 tag:wh:page_echo (each page's last echo)
-- ARGV 1 since, ms (Meta's clock)   2 worker id   3 lease ms
--      4 clock skew ms (Meta's against Redis's)
-- Returns {tracking id or '' (none yet), whether the fleet ever saw an
-- echo (0: no webhooks are tracked; waiting is pointless)}.
-- (prelude.lua in front: `now`, `read_record`)

local ledger = KEYS[1]
local state, holder, _, _, _, digest, call =
  read_record(ledger, redis.pcall('GET', ledger))
if state == 'sending' and holder == ARGV[2] and digest ~= '' then
  redis.call('SET', ledger, 'sending\n' .. string.format('%d', now + tonumber(ARGV[3])) .. '\n'
    .. holder .. '\n' .. digest .. '\n' .. (call or ''), 'KEEPTTL')
end
local close = string.find(ledger, '}', 1, true)
local tag = string.sub(ledger, 1, close)
local tracked = redis.call('EXISTS', KEYS[3])
-- a send is recorded in the hash of its day (after.lua), within a clock
-- skew of its echo
local DAY, skew = 86400000, tonumber(ARGV[4])
local seen = redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf', 'WITHSCORES')
for i = 1, #seen, 2 do
  local t, at = seen[i], tonumber(seen[i + 1])
  local recorded = false
  for day = math.floor((at - skew) / DAY), math.floor((at + skew) / DAY) do
    if redis.call('HEXISTS', tag .. ':tid:' .. string.format('%d', day), t) == 1 then
      recorded = true
      break
    end
  end
  if not recorded then return {t, tracked} end
end
return {'', tracked}
