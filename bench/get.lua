-- GET /get?key=K with K drawn at random from a key file (one URL-encoded key a line).
--   wrk -t1 -c32 -d10s --latency -s bench/get.lua http://127.0.0.1:PORT -- KEYFILE
-- bench/run.py writes the key file: every preloaded key for the proxy, and only the
-- keys a node owns for that node, so every GET finds its key (200, never 404).

local keys = {}
local n = 0
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

function init(args)
  local path = args[1]
  if path == nil then
    error("get.lua needs a key file: wrk ... -s get.lua URL -- KEYFILE")
  end
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
    return wrk.format("GET", "/get?key=k0")
  end
  return wrk.format("GET", "/get?key=" .. keys[math.random(n)])
end
