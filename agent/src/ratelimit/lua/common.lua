-- Shared by the three limit scripts (prepended by the agent; see global.rs).
-- Every quantity is an integer below 2^53, which Lua's doubles hold exactly;
-- the agent refuses configurations that could leave that range.

-- floor(u / a) for integers u >= 0, a >= 1, exact even where the double
-- quotient rounds across an integer.
local function div_floor(u, a)
  local q = math.floor(u / a)
  if q * a > u then
    q = q - 1
  elseif (q + 1) * a <= u then
    q = q + 1
  end
  return q
end

-- ceil(u / a), so a client that waits this long is sure to be admitted.
local function div_ceil(u, a)
  local q = div_floor(u, a)
  if q * a < u then
    q = q + 1
  end
  return q
end

local function at_least_zero(v)
  if v < 0 then
    return 0
  end
  return v
end
