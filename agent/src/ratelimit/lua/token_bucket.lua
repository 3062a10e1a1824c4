-- Token bucket with continuous refill (docs/rate-limiting.md, "Token bucket").
-- KEYS[1]: hash {level, ts}.
-- ARGV: now_ms, amount, period_ms, capacity, grace_ms.
-- Levels are in units where one token is period_ms units and every elapsed
-- millisecond adds `amount` units: refill is an exact integer product.
-- Returns {allowed, limit, remaining, reset_after_ms, retry_after_ms}.
local key = KEYS[1]
local now = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local capacity = tonumber(ARGV[4])
local grace = tonumber(ARGV[5])

local token = period
local full = capacity * period

local state = redis.call('HMGET', key, 'level', 'ts')
local level = tonumber(state[1])
local ts = tonumber(state[2])
if level == nil or ts == nil then
  -- A key seen for the first time starts with a full bucket.
  level = full
  ts = now
end
-- State written under another configuration of this limit id: never more
-- than the current capacity.
if level > full then
  level = full
end
if level < 0 then
  level = 0
end

-- Refill up to now. `ts` is the latest instant refilled to and never moves
-- backwards, so an agent whose clock lags refills nothing and the same span
-- is never refilled twice.
if now > ts then
  local elapsed = now - ts
  if elapsed >= div_ceil(full - level, amount) then
    level = full
  else
    level = level + elapsed * amount
  end
  ts = now
end
-- Non-zero only when this caller's clock is behind the bucket's: waits are
-- counted from the bucket's time, so the caller must also wait out the gap.
local lag = ts - now

local allowed = 0
if level >= token then
  level = level - token
  allowed = 1
end
local retry_after = 0
if allowed == 0 then
  retry_after = lag + div_ceil(token - level, amount)
end
local reset_after = lag + div_ceil(full - level, amount)

redis.call('HSET', key, 'level', level, 'ts', ts)
redis.call('PEXPIRE', key, reset_after + grace)
return {allowed, capacity, div_floor(level, token), reset_after, retry_after}
