from twisted.application.service import ServiceMaker

shardkv = ServiceMaker(
    "shardkv",
    "shardkv.tap",
    "Sharded key-value store: run a storage node, the routing proxy, or a local cluster.",
    "shardkv",
)
