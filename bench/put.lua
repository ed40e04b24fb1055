-- PUT /kv/K with K = PREFIX..N, N random in 1..KEYSPACE, and a VALUE_BYTES-long body.
--   wrk -t1 -c64 -d10s --latency -s bench/put.lua http://127.0.0.1:PORT -- KEYSPACE VALUE_BYTES PREFIX

local keyspace = 100000
local value = string.rep("p", 100)
local prefix = "p"
local counter = 0
local headers = { ["Content-Type"] = "application/octet-stream" }

function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

function init(args)
  keyspace = tonumber(args[1]) or keyspace
  value = string.rep("p", tonumber(args[2]) or 100)
  prefix = args[3] or prefix
  math.randomseed(os.time() * 1000 + (thread_id or 0))
end

function request()
  return wrk.format("PUT", "/kv/" .. prefix .. math.random(keyspace), headers, value)
end
