-- mmsend: what before.lua and after.lua share; the worker sends each of
-- them with this prelude in front (src/fleet/mod.rs).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- `now` as Redis would write it, made once per call: a Lua number given to
-- redis.call is formatted as a double (%.17g), which costs Redis more than
-- the rest of a job's HSET
local now_text = string.format('%d', now)

-- A call carries one or more jobs (the worker gathers the jobs that asked
-- while its previous call was in flight). Jobs with the same 12 scope keys
-- and the same shared arguments (same app, ad account, page and campaign,
-- same settings) form a group, sent once:
--   KEYS  each job's ledger key (n of them), then each group's 12 scope keys
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
    out[j] = f(KEYS[j], n + 12 * g, starts[j], o + shared * g)
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
