-- mmsend: what before.lua and after.lua share; the worker sends each of
-- them with this prelude in front (src/fleet/mod.rs).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- `now` as Redis would write it, made once per call: a Lua number given to
-- redis.call is formatted as a double (%.17g), which costs Redis more than
-- the rest of a job's HSET
local now_text = string.format('%d', now)

-- A call carries one or more jobs (the worker gathers the jobs that asked
-- while its previous call was in flight). Jobs with the same 14 scope keys
-- and the same shared arguments (same app, ad account, page and campaign,
-- same settings) form a group, sent once:
--   KEYS  each job's ledger key (n of them), then each group's 14 scope keys
--   ARGV  n, each job's group (from 1), each job's `own` arguments, then
--         each group's `shared` arguments
-- `own` tells how many own arguments a job has from its first one (a
-- script whose jobs have none passes nil). each_job calls
-- f(ledger_key, k, o, s) for the jobs in order, each as if by a script of
-- its own: scope key i is KEYS[k + i], own argument i is ARGV[o + i],
-- shared argument i is ARGV[s + i]. It returns f's answers.
local function each_job(own, shared, f)
  local n = tonumber(ARGV[1])
  local starts, o = {}, 1 + n
  for j = 1, n do
    starts[j] = o
    if own then o = o + own(ARGV[o + 1]) end
  end
  local out = {}
  for j = 1, n do
    local g = tonumber(ARGV[1 + j]) - 1
    out[j] = f(KEYS[j], n + 14 * g, starts[j], o + shared * g)
  end
  return out
end

-- whether any gate is closed at all: most of the time none is, and one
-- ZCARD then stands for four lookups (a gate key always has its entry in
-- the index; an entry may outlive its key, which only costs the lookups).
-- A script that opens or closes a gate forgets the count.
local gates_indexed = {}
local function any_gate(index)
  local n = gates_indexed[index]
  if n == nil then
    n = redis.call('ZCARD', index)
    gates_indexed[index] = n
  end
  return n > 0
end

-- `value` of a string command on a key that may hold an earlier build's
-- hash: whether it is that hash's WRONGTYPE error (any other error is
-- raised, as redis.call would; a syntax error means a Redis before 7.0,
-- which has no SET with both NX and GET)
local function a_hash(value)
  if type(value) ~= 'table' or not value.err then return false end
  if string.find(value.err, 'WRONGTYPE', 1, true) then return true end
  if string.find(value.err, 'syntax error', 1, true) then
    error({err = 'ERR the send ledger needs Redis 7.0 or newer (SET with NX and GET): ' .. value.err})
  end
  error(value)
end

-- A job's ledger record (KEYS of the job's own key), one string:
--   sending\n<lease until, ms>\n<worker>\n<digest>\n<call id>
--   sent\n<at, ms>\n<suspected 0/1>\n<worker>\n<tracking id>\n<digest>
-- (a worker id has no control characters: src/fleet/mod.rs; the digest is
-- hex, a hash of what makes the send: src/fleet/mod.rs `send_digest`; the
-- call id alphanumeric, as the job's story names its last call). Claims
-- written before the call id was added have none.
-- Builds 0.2 wrote the same without the digest; builds before 0.2 wrote a
-- hash (state, worker, until, tracking, at, suspected, expiry); both are
-- still read (with no digest: a reuse cannot be told from a duplicate
-- there) and replaced when written. `value` is what a string command
-- (`redis.pcall`) returned for the key: a string, false (no record) or a
-- hash's WRONGTYPE error (any other error is raised). Returns state,
-- worker, lease until, tracking id, sent at, digest (nothing for no
-- record; digest '' when the record has none), and a claim's call id
-- (nil when it has none). A string of no known shape
-- that starts as a sent record reads as sent (never called again); any
-- other reads as a claim with no lease left (the worker that takes it
-- over is told it may have been sent).
local function read_record(key, value)
  if not value then return nil end
  if type(value) == 'string' then
    local untl, worker, digest, call = string.match(value, '^sending\n(%d+)\n([^\n]*)\n(%x+)\n(%w*)$')
    if untl then return 'sending', worker, untl, nil, nil, digest, call end
    untl, worker, digest = string.match(value, '^sending\n(%d+)\n([^\n]*)\n(%x+)$')
    if untl then return 'sending', worker, untl, nil, nil, digest end
    untl, worker = string.match(value, '^sending\n(%d+)\n(.*)$')
    if untl then return 'sending', worker, untl, nil, nil, '' end
    local at, _, w, tracking
    at, _, w, tracking, digest = string.match(value, '^sent\n(%d+)\n(%d)\n([^\n]*)\n(.*)\n(%x+)$')
    if at then return 'sent', w, nil, tracking, at, digest end
    at, _, w, tracking = string.match(value, '^sent\n(%d+)\n(%d)\n([^\n]*)\n(.*)$')
    if at then return 'sent', w, nil, tracking, at, '' end
    if string.sub(value, 1, 5) == 'sent\n' then return 'sent', '', nil, '', '0', '' end
    return 'sending', '', '0', nil, nil, ''
  end
  if a_hash(value) then
    local st = redis.call('HMGET', key, 'state', 'worker', 'until', 'tracking', 'at')
    return st[1], st[2], st[3], st[4], st[5], ''
  end
  return nil
end
