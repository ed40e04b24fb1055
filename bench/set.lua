-- POST /set {"key": K, "value": V} with K = PREFIX..N, N random in 1..KEYSPACE,
-- and V a VALUE_BYTES-long ASCII string.
--   wrk -t1 -c32 -d10s --latency -s bench/set.lua http://127.0.0.1:PORT -- KEYSPACE VALUE_BYTES PREFIX

local keyspace = 100000
local value = string.rep("v", 100)
local prefix = "w"
local counter = 0
local headers = { ["Content-Type"] = "application/json" }

function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

function init(args)
  keyspace = tonumber(args[1]) or keyspace
  value = string.rep("v", tonumber(args[2]) or 100)
  prefix = args[3] or prefix
  math.randomseed(os.time() * 1000 + (thread_id or 0))
end

function request()
  local key = prefix .. math.random(keyspace)
  local body = '{"key":"' .. key .. '","value":"' .. value .. '"}'
  return wrk.format("POST", "/set", headers, body)
end
