"""A client of shardkv's own public HTTP API (the proxy's and the nodes' data routes).

L{shardkv.client.api} is the asynchronous client, built on treq and usable over
anything with treq's C{request} (the real network or C{treq.testing.StubTreq});
L{shardkv.client.blocking} runs it on a private reactor thread for synchronous
callers (scripts, the benchmark, threads in fault tests).
"""
