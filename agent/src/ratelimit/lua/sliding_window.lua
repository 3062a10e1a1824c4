-- Sliding-window counter (docs/rate-limiting.md, "Sliding window").
-- KEYS[1]: hash {w, c, p}: the newest window index seen, its count and the
-- previous window's count.
-- ARGV: now_ms, amount, period_ms, grace_ms.
-- A request at offset e into the window is admitted when
-- p * (period - e) + c * period + period <= amount * period (exact integers).
-- Returns {allowed, limit, remaining, reset_after_ms, retry_after_ms}.
local key = KEYS[1]
local now = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local grace = tonumber(ARGV[4])

local window = div_floor(now, period)
local state = redis.call('HMGET', key, 'w', 'c', 'p')
local current = tonumber(state[1])
local count = tonumber(state[2])
local previous = tonumber(state[3])
local changed = false
if current == nil or count == nil or previous == nil then
  current = window
  count = 0
  previous = 0
  changed = true
end
if count > amount then
  count = amount
end
if previous > amount then
  previous = amount
end
if window > current then
  if window - current == 1 then
    previous = count
  else
    previous = 0
  end
  count = 0
  current = window
  changed = true
end

local start = current * period
-- A clock behind the state's window counts as its very start, where the
-- previous window weighs most: the strictest reading.
local offset = at_least_zero(now - start)
if offset > period then
  offset = period
end
local budget = amount * period
local load = previous * (period - offset) + count * period

local allowed = 0
if load + period <= budget then
  allowed = 1
  count = count + 1
  load = load + period
  changed = true
end

-- The smallest offset into a window with these counts at which one more
-- request fits, or nil if none does before the window ends.
local function first_admitting_offset(prev, cur)
  if cur >= amount then
    return nil
  end
  if prev == 0 then
    return 0
  end
  local room = (amount - cur - 1) * period
  local at = at_least_zero(period - div_floor(room, prev))
  if at < period then
    return at
  end
  return nil
end

local retry_after = 0
if allowed == 0 then
  local next_admission
  local at = first_admitting_offset(previous, count)
  if at ~= nil then
    next_admission = start + at
  else
    at = first_admitting_offset(count, 0)
    if at ~= nil then
      next_admission = start + period + at
    else
      next_admission = start + 2 * period
    end
  end
  retry_after = at_least_zero(next_admission - now)
end

local forgotten_at = start
if count > 0 then
  forgotten_at = start + 2 * period
elseif previous > 0 then
  forgotten_at = start + period
end
local reset_after = at_least_zero(forgotten_at - now)

if changed then
  redis.call('HSET', key, 'w', current, 'c', count, 'p', previous)
  redis.call('PEXPIRE', key, reset_after + grace)
end
return {allowed, amount, div_floor(at_least_zero(budget - load), period), reset_after, retry_after}
