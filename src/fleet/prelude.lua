-- mmsend: what before.lua and after.lua share; the worker sends each of
-- them with this prelude in front (src/fleet/mod.rs).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

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
