-- wrk script of the console benchmark's ingest load: device HTTP API telemetry posts.
--
--   wrk -t2 -c16 -d8s -s bench/wrk/telemetry.lua http://127.0.0.1:PORT -- TOKENS_FILE FIRST_TS
--
-- TOKENS_FILE: one device token per line. Each request posts 100 items of 2 keys (200
-- points) for the next device in turn, with timestamps 1 ms apart that no other request
-- uses (FIRST_TS + a range per thread), so every point is new.
-- wrk gives each thread its own Lua state: init() runs once per thread.

local tokens = {}
local next_token = 0
local ts = 0
local headers = { ["Content-Type"] = "application/json" }
local ITEMS = 100

local thread_count = 0
function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then tokens[#tokens + 1] = line end
  end
  assert(#tokens > 0, "no token in " .. tostring(args[1]))
  ts = tonumber(args[2]) + (thread_id or 0) * 1000000000
end

function request()
  next_token = next_token % #tokens + 1
  local items = {}
  for i = 1, ITEMS do
    items[i] = string.format('{"ts":%d,"values":{"a":%d,"b":%d}}', ts + i, i, i * 2)
  end
  ts = ts + ITEMS
  local path = "/api/v1/" .. tokens[next_token] .. "/telemetry"
  return wrk.format("POST", path, headers, "[" .. table.concat(items, ",") .. "]")
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"errors":%d}\n',
    summary.requests, summary.duration,
    errors.connect + errors.read + errors.write + errors.status + errors.timeout))
end
