"""shardkv: a sharded key-value store.

The package is layered so that imports only point down:

- ``shardkv.core``: pure logic (placement, keys, versions, records). No Twisted.
- ``shardkv.storage``: storage engines behind one interface.
- ``shardkv.http``: what the node and the proxy share (errors, limits, client).
- ``shardkv.node`` and ``shardkv.proxy``: Klein apps and their services.
- ``shardkv.tap``: twistd options and the service tree.
"""

__version__ = "0.1.0"
