-- mmsend: the delivery tracker's join (src/fleet/track.rs), for the events
-- of one stored webhook payload, in order, atomically each.
--
-- KEYS[1]  the hash tag `{<prefix>}` (every key below is built from it, so
--          all are in its Redis Cluster slot)
-- ARGV     1 n events   2 tracking retention ms (the ledger's)
--          3 campaign retention ms   4 last try (1/0)   5 clock skew ms
--          then 7 per event:
--          field's status (echoed | delivered | read | clicked |
--          delivery_failed), tracking id (''), send key (hex of token
--          and message id; ''), timestamp ms, dedupe digest (hex),
--          message id (''), error message ('')
--
-- Keys (tag = KEYS[1]):
--   tag:tid:<day>           hash: tracking id → '<n>:<job id><campaign>'
--                           (after.lua, per send, in the hash of the day of
--                           Redis's clock it was sent; looked up from the
--                           event's day back over the ledger retention)
--   tag:wh:sends:<send key> sorted set: the tracking ids Meta reported for
--                           that token and message id, scored by the
--                           earliest event seen of each (clicks and
--                           failures join the latest before them; a
--                           maybe-sent job looks here for its echo)
--   tag:dlv:<job id>        hash: status, tracking, the first time of each
--                           status (Meta's timestamps), error
--   tag:campaign:<name>     the campaign's hash: the funnel counters
--                           echoed, delivered, read, clicked,
--                           delivery_failed, unmatched
--   tag:wh:campaign_of      hash: message id → campaign (last matched), to
--                           put an unmatched event under its campaign
--   tag:wh:seen:<digest>    an unmatched event already counted
--
-- A matched event counts once per send and field: the job's hash keeps the
-- first time of each, so Meta's redeliveries (and a payload taken twice)
-- change nothing. An unmatched event is left for a later try ('defer')
-- unless this is the last one, then counted once ('unmatched', its dedupe
-- digest remembered for the tracking retention).
--
-- Returns per event {result, job, campaign, status, first, changed,
-- tracking id}: result matched | defer | unmatched | duplicate; first 1
-- when the event is the first of its field for the job; changed 1 when the
-- status moved; the tracking id of the send it joined ('' none).

local tag = KEYS[1]
local n = tonumber(ARGV[1])
local retention, campaign_retention = ARGV[2], ARGV[3]
local last_try, skew = ARGV[4] == '1', tonumber(ARGV[5])

local rank = {sent = 0, echoed = 1, delivered = 2, read = 3, clicked = 4}
-- forward only; a failure ends a send nothing was heard of past its echo;
-- nothing moves a failed send (src/webhooks/events.rs Status::moves_to)
local function moves(now, next)
  local a, b = rank[now], rank[next]
  if a and b then return b > a end
  if a then return a <= 1 end
  return false
end

local DAY = 86400000
local days_kept = math.ceil(tonumber(retention) / DAY) + 1

-- the job and campaign that sent `tracking`: the send was recorded in the
-- hash of its day, at most a clock skew after `at` (an event of the send,
-- or the earliest one seen of it) and at most the retention before
local function job_of(tracking, at)
  if tracking == '' then return nil end
  local from = math.floor((at + skew) / DAY)
  local v
  for day = from, from - days_kept, -1 do
    v = redis.call('HGET', tag .. ':tid:' .. string.format('%d', day), tracking)
    if v then break end
  end
  if not v then return nil end
  local len, rest = string.match(v, '^(%d+):(.*)$')
  if not len then return nil end
  len = tonumber(len)
  return string.sub(rest, 1, len), string.sub(rest, len + 1)
end

local out = {}
for i = 1, n do
  local b = 5 + (i - 1) * 7
  local status, tracking, send, ts = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], tonumber(ARGV[b + 4])
  local digest, message, err = ARGV[b + 5], ARGV[b + 6], ARGV[b + 7]
  -- a tracking id Meta reported indexes its send by token and message
  if tracking ~= '' and send ~= '' then
    local key = tag .. ':wh:sends:' .. send
    redis.call('ZADD', key, 'LT', ts, tracking)
    redis.call('PEXPIRE', key, retention)
  end
  local at = ts
  if tracking == '' and send ~= '' then
    local r = redis.call('ZREVRANGEBYSCORE', tag .. ':wh:sends:' .. send, ts + skew, '-inf',
      'WITHSCORES', 'LIMIT', 0, 1)
    tracking = r[1] or ''
    at = tonumber(r[2]) or ts
  end
  local job, campaign = job_of(tracking, at)
  if not job then
    if not last_try then
      out[i] = {'defer', '', '', '', 0, 0, ''}
    else
      local seen = tag .. ':wh:seen:' .. digest
      if redis.call('SET', seen, '1', 'NX', 'PX', retention) then
        local c = message ~= '' and redis.call('HGET', tag .. ':wh:campaign_of', message) or false
        if c then
          local ckey = tag .. ':campaign:' .. c
          redis.call('HINCRBY', ckey, 'unmatched', 1)
          redis.call('PEXPIRE', ckey, campaign_retention)
        end
        out[i] = {'unmatched', '', c or '', '', 0, 0, ''}
      else
        out[i] = {'duplicate', '', '', '', 0, 0, ''}
      end
    end
  else
    local d = tag .. ':dlv:' .. job
    local first = redis.call('HSETNX', d, status, string.format('%d', ts))
    local now = redis.call('HGET', d, 'status') or 'sent'
    local changed = 0
    if moves(now, status) then
      redis.call('HSET', d, 'status', status)
      now, changed = status, 1
    end
    if first == 1 then
      redis.call('HSETNX', d, 'tracking', tracking)
      if err ~= '' then redis.call('HSET', d, 'error', err) end
      redis.call('PEXPIRE', d, retention)
      local ckey = tag .. ':campaign:' .. campaign
      redis.call('HINCRBY', ckey, status, 1)
      redis.call('PEXPIRE', ckey, campaign_retention)
      if message ~= '' then
        redis.call('HSET', tag .. ':wh:campaign_of', message, campaign)
        redis.call('PEXPIRE', tag .. ':wh:campaign_of', campaign_retention)
      end
    end
    out[i] = {first == 1 and 'matched' or 'duplicate', job, campaign, now, first, changed,
      tracking}
  end
end
return out
