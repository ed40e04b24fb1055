"""shardkv: a sharded key-value store.

The package is layered so that imports only point down (see docs/architecture.md):

- ``shardkv.errors``: the domain's errors; imports nothing of shardkv.
- ``shardkv.core``: pure logic (placement, keys, versions, records, quorums, the write
  rule). No Twisted.
- ``shardkv.storage``: storage engines behind one interface.
- ``shardkv.replica``: the proxy-to-node protocol, both ends.
- ``shardkv.web``: the HTTP site, the data API routes, the error-to-status table.
- ``shardkv.node`` and ``shardkv.proxy``: Klein apps, their domain logic and their services.
- ``shardkv.client``: a client of the public API.
- ``shardkv.testing``: in-memory clusters, real processes and history checkers for tests.
- ``shardkv.tap``: twistd options and the service tree.
"""

__version__ = "0.1.0"
