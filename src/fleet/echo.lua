-- mmsend: evidence for a maybe-sent job (src/fleet/track.rs): an echo Meta
-- sent for the job's page, token and message id since `since` whose
-- tracking id no job recorded as its send. The job's claim is renewed in
-- the same call, so a job that waits for its echo keeps its lease.
--
-- KEYS 1 the job's ledger key   2 tag:wh:sends:<send key> (track.lua)
--      3 tag:wh:page_echo (each page's last echo)
-- ARGV 1 since, ms (Meta's clock)   2 worker id   3 lease ms   4 page id
-- Returns {tracking id or '' (none yet), whether any echo of the page was
-- ever seen (0: webhooks are not tracked for it; waiting is pointless)}.
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
local tracked = redis.call('HEXISTS', KEYS[3], ARGV[4])
for _, t in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf')) do
  if redis.call('EXISTS', tag .. ':tid:' .. t) == 0 then return {t, tracked} end
end
return {'', tracked}
