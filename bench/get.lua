-- GET /get?key=K with K drawn at random from a key file (one URL-encoded key a line).
--   wrk -t1 -c32 -d10s --latency -s bench/get.lua http://127.0.0.1:PORT -- KEYFILE [PREFIX]
-- PREFIX is what comes before the key in the path: "/get?key=" (the default), or
-- "/kv/" for a node's GET /kv/K (run.py ceiling measures both).
-- bench/run.py writes the key file: every preloaded key for the proxy, and only the
-- keys a node owns for that node, so every GET finds its key (200, never 404).

local keys = {}
local n = 0
local prefix = "/get?key="
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

function init(args)
  local path = args[1]
  if path == nil then
    error("get.lua needs a key file: wrk ... -s get.lua URL -- KEYFILE [PREFIX]")
  end
  prefix = args[2] or prefix
  for line in io.lines(path) do
    if line ~= "" then
      n = n + 1
      keys[n] = line
    end
  end
  if n == 0 then
    error("get.lua: no keys in " .. path)
  end
  math.randomseed(os.time() * 1000 + (thread_id or 0))
end

function request()
  -- wrk calls request() once before init() to check the script; any key will do.
  if n == 0 then
    return wrk.format("GET", prefix .. "k0")
  end
  return wrk.format("GET", prefix .. keys[math.random(n)])
end
