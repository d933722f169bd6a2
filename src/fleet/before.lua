-- mmsend: everything a worker asks the fleet before a Graph call, for one
-- or more jobs in one round trip (the worker gathers the jobs that asked
-- while its previous call was in flight). Every key shares the {prefix}
-- hash tag (one Redis Cluster slot). The jobs are taken in order, each as
-- if by a script of its own.
--
-- The call's layout is in prelude.lua (each_job); per job:
-- scope keys  1..4   gate hashes: app, ad account, page, campaign
--             5..8   probe locks of those gates, same order
--             9      GCRA state of the page
--             10     GCRA state of the whole fleet (global pacing)
--             11     lowered rate of the page (after a page rate limit)
--             12     index of open gates (sorted set, score = expiry)
--             13     the campaign's hash (state, counters: campaign.rs)
--             14     the set of paused and cancelled campaigns
-- shared args 1 worker id         2 lease ms (request timeout + margin)
--             3 page rate /s      4 global rate /s (0 = off)
--             5 probe wait ms     6 probe lock ms
--             7 gates on (1/0)    8 ledger on (1/0)
--             9 ledger retention ms
-- round's last argument: its deadline in Redis's clock, ms (0 = none)
-- own args    1 the send's digest (hex: ad account, page, message id,
--               recipient, message; src/fleet/mod.rs `send_digest`)
--             2 this call's id (alphanumeric, written into the claim)
--             3 the id of the job's last call, as its story says ('' none)
--
-- Returns, for each job, one of
--   {'reused', state, worker}                  the record is another send's
--                                              (same job_id, other digest)
--   {'sent', tracking_id, sent_at_ms}          already sent: ack, no call
--   {'busy', worker, remaining_ms}             in flight on another worker
--   {'gated', scope_index, class, code, wait_ms}  held: no claim, no call
--   {'paused' | 'cancelled', previous}         the campaign is stopped: no
--                                              claim, no call; previous '1'
--                                              when a record was there
--                                              (maybe sent)
--   {'late', ms}                               run past the round's deadline:
--                                              nothing written
--   pace_wait_ms * 2 + maybe_sent (an integer)   claimed: call after the wait
-- (the common answer is one integer: nothing for Redis to format or the
-- worker to parse as strings)
-- (prelude.lua in front: `now`, `now_text`, `each_job`, `any_gate`,
-- `read_record`)

-- GCRA with reservation. The job takes the next slot of its page (and of
-- the fleet) and is told how long to wait for it, so a paced job needs no
-- second round trip. Burst: one second's worth.
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

-- this worker's claim with its lease until `untl` (prelude.lua's layout)
local function claim(worker, untl, digest, call)
  return 'sending\n' .. string.format('%d', untl) .. '\n' .. worker .. '\n' .. digest
    .. '\n' .. call
end

-- three own arguments per job: its digest, this call's id, its last call's
local function own() return 3 end

-- whether any campaign is paused or cancelled at all: most of the time
-- none is, and one SCARD per round stands for a lookup per job; then the
-- state of each campaign asked about, once per round
local controlled_count, controlled_state = nil, {}
local function stopped(set, campaign)
  if controlled_count == nil then controlled_count = redis.call('SCARD', set) end
  if controlled_count == 0 then return nil end
  local state = controlled_state[campaign]
  if state == nil then
    state = redis.call('HGET', campaign, 'state') or 'active'
    controlled_state[campaign] = state
  end
  if state == 'paused' or state == 'cancelled' then return state end
  return nil
end

local function one(ledger, k, o, a)
  local worker = ARGV[a + 1]
  local digest, call = ARGV[o + 1], ARGV[o + 2]

  -- 1. the ledger: a job already sent is never called again; a live lease
  --    of another worker means the call is in flight elsewhere. The claim
  --    is written in the same command when there is no record (the common
  --    case: one command for the job's whole ledger step); it is taken back
  --    if a gate holds the job and rewritten if pacing makes it wait
  local ledger_on = ARGV[a + 8] == '1'
  local lease = tonumber(ARGV[a + 2])
  local claimed, previous = false, false
  if ledger_on then
    local value = redis.pcall('SET', ledger, claim(worker, now + lease, digest, call),
      'NX', 'GET', 'PX', ARGV[a + 9])
    if value == false then
      claimed = true
    else
      local state, holder, untl, tracking, at, was, by_call = read_record(ledger, value)
      -- the same job_id for another send (a producer that numbers jobs
      -- per campaign): never a duplicate of this one, never called under
      -- the other's record
      if was ~= '' and was ~= digest then
        return {'reused', state or '', holder or ''}
      end
      if state == 'sent' then
        return {'sent', tracking or '', at or '0'}
      end
      local left = (tonumber(untl) or 0) - now
      if state == 'sending' and holder ~= worker and left > 0 then
        return {'busy', holder or '', tostring(left)}
      end
      -- the holder died (or lost its broker connection) mid-call, or this
      -- worker's own earlier claim: maybe sent; unless the claim is the
      -- job's last call, whose answer its story carries (the worker could
      -- not tell Redis how it ended: Redis paused or frozen then)
      previous = by_call == nil or by_call == '' or by_call ~= ARGV[o + 3]
    end
  end

  -- 2. campaign control: a job of a paused or cancelled campaign is not
  --    called. The claim written above is taken back; a record that was
  --    there stays as it was (its job may have been sent: the worker is
  --    told, and the job keeps saying so)
  local state = stopped(KEYS[k + 14], KEYS[k + 13])
  if state then
    if claimed then redis.call('DEL', ledger) end
    return {state, previous and '1' or '0'}
  end

  -- 3. gates: a closed scope holds the job; once its time is up, one job
  --    at a time goes through as the probe
  if ARGV[a + 7] == '1' and any_gate(KEYS[k + 12]) then
    for i = 1, 4 do
      local g = redis.call('HMGET', KEYS[k + i], 'class', 'code', 'until')
      if g[1] then
        local untl = tonumber(g[3]) or 0
        local held = nil
        if now < untl then
          held = tostring(untl - now)
        elseif not redis.call('SET', KEYS[k + i + 4], worker, 'NX', 'PX', ARGV[a + 6]) then
          held = ARGV[a + 5]
        end
        if held then
          -- held: no claim (the one written above is taken back)
          if claimed then redis.call('DEL', ledger) end
          return {'gated', tostring(i), g[1], g[2] or '', held}
        end
      end
    end
  end

  -- 4. pacing: the page's slot (at its lowered rate after a page rate
  --    limit) and the fleet's
  local page_rate = tonumber(ARGV[a + 3]) or 0
  if page_rate > 0 then
    local lowered = tonumber(redis.call('GET', KEYS[k + 11]) or '')
    if lowered and lowered < page_rate then page_rate = lowered end
  end
  local wait = math.max(reserve(KEYS[k + 9], page_rate),
    reserve(KEYS[k + 10], tonumber(ARGV[a + 4]) or 0))
  wait = math.ceil(wait)

  -- 5. the claim: sending, by this worker, for the wait plus a lease that
  --    covers the request timeout (already written above unless a record
  --    was there or the job waits for its slot); the key expires after
  --    the ledger retention, counted from here
  if ledger_on and (not claimed or wait > 0) then
    redis.call('SET', ledger, claim(worker, now + wait + lease, digest, call), 'PX', ARGV[a + 9])
  end
  return wait * 2 + (previous and 1 or 0)
end

-- The round's deadline in Redis's clock, its last argument (0: none): a
-- round Redis runs after it (it was paused, frozen or stalled, and the
-- worker has given up on it) writes nothing, or its claims would be
-- orphans a later claim takes for maybe sent (src/fleet/mod.rs).
local deadline = tonumber(ARGV[#ARGV]) or 0
if deadline > 0 and now > deadline then
  local late, by = {}, string.format('%d', now - deadline)
  for j = 1, tonumber(ARGV[1]) do late[j] = {'late', by} end
  return late
end

return each_job(own, 9, one)
