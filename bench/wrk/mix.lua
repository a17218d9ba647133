-- wrk script of the REST API load test (bench/bench_api.py writes the data file).
--
--   wrk -t2 -c100 -d30s -s bench/wrk/mix.lua https://127.0.0.1:PORT -- DATA_FILE [MODE]
--
-- DATA_FILE lines (space separated):
--   share <login> <list> <latest> <history_agg> <history_raw>   request mix, fractions
--   window <start_ms> <end_ms>                                   the 24-hour history window
--   tenant <username> <password> <access_token>                 one per tenant
--   device <tenant index, 1-based> <device uuid>                 the tenant's devices
-- MODE: "mix" (default) or "healthz": the same connections and script overhead, but every
-- request is GET /healthz (the baseline: the server does no work).
--
-- Each request picks a random tenant (as if one of its operators clicked) and, where it
-- needs one, a random device of that tenant. Tokens were fetched by bench_api.py before the
-- run; the rare logins in the mix are real bcrypt logins whose answer is only checked for
-- its status (wrk counts non-2xx answers as errors).
-- wrk gives each thread its own Lua state: init() runs once per thread.

local tenants = {}
local shares = {}
local window_start, window_end = 0, 0
local mode = "mix"
local json_headers = { ["Content-Type"] = "application/json" }

local function read_data(path)
  local file = assert(io.open(path, "r"), "cannot open data file " .. tostring(path))
  for line in file:lines() do
    local fields = {}
    for word in line:gmatch("%S+") do
      fields[#fields + 1] = word
    end
    local kind = fields[1]
    if kind == "share" then
      shares = {
        login = tonumber(fields[2]),
        list = tonumber(fields[3]),
        latest = tonumber(fields[4]),
        history_agg = tonumber(fields[5]),
        history_raw = tonumber(fields[6]),
      }
    elseif kind == "window" then
      window_start, window_end = fields[2], fields[3]
    elseif kind == "tenant" then
      local body = string.format('{"username":"%s","password":"%s"}', fields[2], fields[3])
      tenants[#tenants + 1] = {
        login_body = body,
        auth = { ["Authorization"] = "Bearer " .. fields[4] },
        devices = {},
        pages = 1,
      }
    elseif kind == "device" then
      local tenant = tenants[tonumber(fields[2])]
      tenant.devices[#tenant.devices + 1] = fields[3]
    end
  end
  file:close()
  for _, tenant in ipairs(tenants) do
    -- pages of 20 devices, as a device table in a dashboard shows them
    tenant.pages = math.max(1, math.ceil(#tenant.devices / 20))
  end
end

local thread_count = 0
function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
end

function init(args)
  read_data(args[1])
  mode = args[2] or "mix"
  math.randomseed(os.time() * 1000 + (thread_id or 0))
  assert(#tenants > 0, "no tenant in the data file")
end

local function pick(list)
  return list[math.random(#list)]
end

function request()
  local tenant = pick(tenants)
  if mode == "healthz" then
    return wrk.format("GET", "/healthz", tenant.auth)
  end
  local r = math.random()
  if r < shares.login then
    return wrk.format("POST", "/api/auth/login", json_headers, tenant.login_body)
  end
  r = r - shares.login
  if r < shares.list then
    local offset = (math.random(tenant.pages) - 1) * 20
    return wrk.format("GET", "/api/devices?limit=20&offset=" .. offset, tenant.auth)
  end
  r = r - shares.list
  local device = pick(tenant.devices)
  if r < shares.latest then
    return wrk.format("GET", "/api/devices/" .. device .. "/telemetry/latest", tenant.auth)
  end
  r = r - shares.latest
  local path
  if r < shares.history_agg then
    -- a dashboard chart: one key over 24 hours, one average per 5 minutes (288 points)
    path = string.format(
      "/api/devices/%s/telemetry?keys=temperature&start=%s&end=%s&agg=avg&interval=5m",
      device, window_start, window_end)
  else
    -- raw points of one key over 24 hours (2,400 points stored in the window)
    path = string.format(
      "/api/devices/%s/telemetry?keys=pressure&start=%s&end=%s&limit=10000",
      device, window_start, window_end)
  end
  return wrk.format("GET", path, tenant.auth)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
