-- Fixed window aligned to the Unix epoch (docs/rate-limiting.md, "Fixed window").
-- KEYS[1]: hash {w, n}: the newest window index seen and its admissions.
-- ARGV: now_ms, amount, period_ms, grace_ms.
-- Returns {allowed, limit, remaining, reset_after_ms, retry_after_ms}.
local key = KEYS[1]
local now = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local grace = tonumber(ARGV[4])

local window = div_floor(now, period)
local state = redis.call('HMGET', key, 'w', 'n')
local current = tonumber(state[1])
local admitted = tonumber(state[2])
-- A clock behind the newest window seen is charged to that window; it never
-- reopens an older, emptier one.
if current == nil or admitted == nil or window > current then
  current = window
  admitted = 0
end
if admitted > amount then
  admitted = amount
end

local allowed = 0
if admitted < amount then
  admitted = admitted + 1
  allowed = 1
end
local reset_after = at_least_zero((current + 1) * period - now)
local retry_after = 0
if allowed == 1 then
  -- Only an admission changes the state (a new window always admits).
  redis.call('HSET', key, 'w', current, 'n', admitted)
  redis.call('PEXPIRE', key, reset_after + grace)
else
  retry_after = reset_after
end
return {allowed, amount, amount - admitted, reset_after, retry_after}
