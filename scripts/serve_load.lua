-- wrk script for scripts/bench_serve_load.py: POST /v1/embeddings, one distinct pre-encoded JSON body per request.
--
--   wrk -t2 -c200 -d300s --timeout 60s -s scripts/serve_load.lua http://127.0.0.1:PORT -- BODIES_FILE PER_THREAD 2
--
-- BODIES_FILE holds one JSON request body per line. With T threads, thread i (1-based) sends lines i, i+T, i+2T, ...
-- so no text is sent twice (the server's LRU cache never answers), and stops after PER_THREAD responses: the run
-- is bounded in count (T * PER_THREAD) and, by -d, in time. done() prints one JSON line starting "WRK_RESULT ".

-- The last argument is the thread count (-t), the stride between one thread's lines.
local next_id = 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  bodies = {}
  for line in io.lines(args[1]) do
    table.insert(bodies, line)
  end
  limit = tonumber(args[2])
  stride = tonumber(args[3])
  cursor = id
  responses = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local body = bodies[((cursor - 1) % #bodies) + 1]
  cursor = cursor + stride
  return wrk.format("POST", "/v1/embeddings", nil, body)
end

function response(status, headers, body)
  responses = responses + 1  -- wrk itself counts non-2xx answers in summary.errors.status
  if responses == limit then
    -- wrk's main thread sleeps for all of -d whatever its threads do; the benchmark stops it with SIGINT once every
    -- thread has said this line, and times the run by them.
    io.stdout:write("WRK_THREAD_DONE\n")
    io.stdout:flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
