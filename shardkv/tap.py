"""twistd options and the service tree for ``twistd shardkv node|proxy|cluster``.

Each subcommand's options turn into keyword arguments for one service
factory; the factories know nothing about command lines, so tests build the
same services directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage

from shardkv.node.service import make_node_service
from shardkv.proxy.service import DEFAULT_PIPELINE_DEPTH, make_proxy_service
from shardkv.storage.durability import check_durability
from shardkv.storage.engine import StorageEngine
from shardkv.storage.memory import MemoryEngine
from shardkv.web.dataroutes import DEFAULT_MAX_VALUE_BYTES

DEFAULT_PROXY_PORT = 8080
DEFAULT_NODE_PORTS = (8081, 8082, 8083)
DEFAULT_DATA_ROOT = "shardkv-data"

log = Logger(namespace="shardkv")


def _loopback(port: int) -> str:
    return f"tcp:{port}:interface=127.0.0.1"


def parse_nodes(text: str) -> dict[str, float]:
    """``host:port[=weight],...`` into an ordered mapping of node to weight."""
    nodes: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        address, _, weight = item.partition("=")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise usage.UsageError(f"--nodes: {item!r} is not host:port[=weight]")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise usage.UsageError(f"--nodes: weight {weight!r} is not a number") from None
        if value <= 0:
            raise usage.UsageError(f"--nodes: weight of {address} must be positive")
        if address in nodes:
            raise usage.UsageError(f"--nodes: {address} is listed twice")
        nodes[address] = value
    if not nodes:
        raise usage.UsageError("--nodes: no nodes given")
    return nodes


def _positive(kind: type, name: str, allow_zero: bool = False) -> Callable[[str], Any]:
    """A coercer for numbers above zero (or at least zero)."""

    def coerce(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, not {text!r}") from None
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"{name} must be {'zero or more' if allow_zero else 'positive'}")
        return value

    coerce.coerceDoc = "Zero or more." if allow_zero else "Must be positive."  # type: ignore[attr-defined]
    return coerce


class _ServerOptions(usage.Options):
    """What every server subcommand shares: where to listen and body limits."""

    default_port = 0
    optFlags = [
        ["access-log", None, "Log every request (costs about 20 % of throughput)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Add a Twisted endpoint string to listen on, e.g. tcp:8081:interface=0.0.0.0
        or ssl:8443:privateKey=key.pem:certKey=cert.pem. Repeatable.
        """
        self["listen"].append(endpoint)

    def endpoints(self) -> list[str]:
        """Every --listen endpoint, plus --port if given (or nothing else was)."""
        if self["listen"] and not self._port_given:
            return list(self["listen"])
        return [*self["listen"], _loopback(self["port"])]

    def postOptions(self) -> None:
        self._port_given = self["port"] is not None
        if self["port"] is None:
            self["port"] = self.default_port


class NodeOptions(_ServerOptions):
    synopsis = "[options]"
    longdesc = (
        "Run one storage node. It serves the data API (/set, /get, /kv/{key}) and "
        "/health, and keeps its records in an embedded database under --data-dir."
    )
    default_port = DEFAULT_NODE_PORTS[0]
    optParameters = [
        ["port", "p", None, "TCP port on 127.0.0.1 (default 8081); --listen for others.", int],
        ["node-id", None, None, "Name of this node in versions (default 127.0.0.1:PORT)."],
        ["storage", None, "lmdb", "Storage engine: lmdb (durable) or memory (lost on restart)."],
        ["data-dir", None, None, "Where lmdb keeps data (default ./shardkv-data/node-PORT)."],
        [
            "durability",
            None,
            "always",
            "always: fsync each group commit before acknowledging; batch: fsync every second "
            "(power loss can lose ~1 s); os: never fsync (power loss can lose ~30 s).",
        ],
        [
            "max-value-bytes",
            None,
            DEFAULT_MAX_VALUE_BYTES,
            "Largest value accepted.",
            _positive(int, "--max-value-bytes"),
        ],
        ["clock-offset-ms", None, 0, "Skew this node's wall clock (for testing).", int],
    ]

    def _check_storage(self) -> None:
        if self["storage"] not in ("lmdb", "memory"):
            raise usage.UsageError("--storage must be lmdb or memory")
        try:
            check_durability(self["durability"])
        except ValueError as e:
            raise usage.UsageError(f"--durability: {e}") from None

    def postOptions(self) -> None:
        super().postOptions()
        self._check_storage()
        if self["node-id"] is None:
            self["node-id"] = f"127.0.0.1:{self['port']}"
        if self["data-dir"] is None:
            self["data-dir"] = os.path.join(DEFAULT_DATA_ROOT, f"node-{self['port']}")


class ProxyOptions(_ServerOptions):
    synopsis = "[options]"
    longdesc = (
        "Run the routing proxy. It places each key on a node by consistent hashing and "
        "forwards the request; /cluster and /explain?key= show the placement."
    )
    default_port = DEFAULT_PROXY_PORT
    optParameters = [
        ["port", "p", None, "TCP port on 127.0.0.1 (default 8080); --listen for others.", int],
        [
            "nodes",
            None,
            ",".join(f"127.0.0.1:{p}" for p in DEFAULT_NODE_PORTS),
            "Comma-separated nodes, host:port[=weight].",
        ],
        [
            "vnodes",
            None,
            None,
            "Ring points per unit of weight (default: the ring's).",
            _positive(int, "--vnodes"),
        ],
        [
            "timeout",
            None,
            2.0,
            "Seconds to wait for a node before answering 504.",
            _positive(float, "--timeout"),
        ],
        [
            "pool-size",
            None,
            64,
            "Persistent connections kept per node.",
            _positive(int, "--pool-size"),
        ],
        [
            "pipeline-depth",
            None,
            DEFAULT_PIPELINE_DEPTH,
            "Replica batches in flight per node; 0 sends one request per operation.",
            _positive(int, "--pipeline-depth", allow_zero=True),
        ],
        [
            "health-interval",
            None,
            1.0,
            "Seconds between node health checks.",
            _positive(float, "--health-interval"),
        ],
        [
            "max-value-bytes",
            None,
            DEFAULT_MAX_VALUE_BYTES,
            "Largest value accepted.",
            _positive(int, "--max-value-bytes"),
        ],
        [
            "replicas",
            None,
            3,
            "Copies of each key (N); fewer while the cluster is smaller.",
            _positive(int, "--replicas"),
        ],
        ["r", None, 2, "Default read quorum R (a request may set ?r=).", _positive(int, "--r")],
        ["w", None, 2, "Default write quorum W (a request may set ?w=).", _positive(int, "--w")],
        ["proxy-id", None, None, "Name of this proxy in versions it mints (default proxy-PORT)."],
        ["clock-offset-ms", None, 0, "Skew this proxy's wall clock (for testing).", int],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self["nodes"] = parse_nodes(self["nodes"])
        if self["r"] > self["replicas"] or self["w"] > self["replicas"]:
            raise usage.UsageError("--r and --w must not exceed --replicas")
        if self["proxy-id"] is None:
            self["proxy-id"] = f"proxy-{self['port']}"


class ClusterOptions(NodeOptions):
    synopsis = "[options]"
    longdesc = (
        "Run a whole local cluster in one process for trying shardkv out: three nodes "
        "on 127.0.0.1:8081-8083 and the proxy on 127.0.0.1:8080, like `consul agent -dev`."
    )
    default_port = DEFAULT_PROXY_PORT
    optParameters = [
        ["port", "p", None, "Proxy port on 127.0.0.1 (default 8080).", int],
        [
            "node-ports",
            None,
            ",".join(map(str, DEFAULT_NODE_PORTS)),
            "Comma-separated node ports on 127.0.0.1.",
        ],
        ["data-dir", None, None, f"Root for node data (default ./{DEFAULT_DATA_ROOT})."],
        [
            "timeout",
            None,
            2.0,
            "Seconds the proxy waits for a node.",
            _positive(float, "--timeout"),
        ],
    ]

    def postOptions(self) -> None:
        _ServerOptions.postOptions(self)
        try:
            self["node-ports"] = [int(p) for p in self["node-ports"].split(",") if p.strip()]
        except ValueError:
            raise usage.UsageError("--node-ports must be comma-separated numbers") from None
        if not self["node-ports"]:
            raise usage.UsageError("--node-ports: no ports given")
        self._check_storage()
        if self["data-dir"] is None:
            self["data-dir"] = DEFAULT_DATA_ROOT


class Options(usage.Options):
    synopsis = "node|proxy|cluster [options]"
    longdesc = "shardkv: a sharded key-value store. Run a storage node, the proxy, or both."
    subCommands = [
        ["node", None, NodeOptions, "Run a storage node (default port 8081)."],
        ["proxy", None, ProxyOptions, "Run the routing proxy (default port 8080)."],
        ["cluster", None, ClusterOptions, "Run 3 nodes and the proxy in one process."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("choose a subcommand: node, proxy or cluster")
        self._avoid_pidfile_clash()

    def _avoid_pidfile_clash(self) -> None:
        """Give each server its own pidfile unless the user chose one.

        ``twistd -n`` still writes ./twistd.pid, so the seed's quick start
        (three nodes started from one directory) would refuse the second node.
        """
        parent = getattr(self, "parent", None)
        if parent is None or parent.get("pidfile") != "twistd.pid":
            return
        if parent.get("nodaemon"):
            parent["pidfile"] = ""
        else:
            parent["pidfile"] = f"shardkv-{self.subCommand}-{self.subOptions['port']}.pid"


def _now_ms(reactor: Any, offset_ms: int) -> Callable[[], int]:
    return lambda: int(reactor.seconds() * 1000) + offset_ms


def _engine(config: Any, data_dir: str, reactor: Any) -> StorageEngine:
    if config["storage"] == "memory":
        return MemoryEngine()
    from shardkv.storage.lmdb.engine import LMDBEngine

    return LMDBEngine(data_dir, reactor, durability=config["durability"])


def _node(
    config: Any, reactor: Any, *, node_id: str, data_dir: str, listen: list[str]
) -> MultiService:
    return make_node_service(
        reactor=reactor,
        node_id=node_id,
        engine=_engine(config, data_dir, reactor),
        listen=listen,
        max_value_bytes=config["max-value-bytes"],
        now_ms=_now_ms(reactor, config["clock-offset-ms"]),
        access_log=config["access-log"],
    )


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    sub = config.subOptions
    if config.subCommand == "node":
        return _node(
            sub, reactor, node_id=sub["node-id"], data_dir=sub["data-dir"], listen=sub.endpoints()
        )
    if config.subCommand == "proxy":
        return make_proxy_service(
            reactor=reactor,
            nodes=sub["nodes"],
            listen=sub.endpoints(),
            max_value_bytes=sub["max-value-bytes"],
            timeout=sub["timeout"],
            vnodes=sub["vnodes"],
            pool_size=sub["pool-size"],
            pipeline_depth=sub["pipeline-depth"],
            health_interval=sub["health-interval"],
            access_log=sub["access-log"],
            replicas=sub["replicas"],
            r=sub["r"],
            w=sub["w"],
            writer_id=sub["proxy-id"],
            clock_offset_ms=sub["clock-offset-ms"],
        )
    return _cluster(sub, reactor)


def _cluster(sub: ClusterOptions, reactor: Any) -> MultiService:
    top = MultiService()
    nodes = {}
    for port in sub["node-ports"]:
        node_id = f"127.0.0.1:{port}"
        data_dir = os.path.join(sub["data-dir"], f"node-{port}")
        _node(
            sub, reactor, node_id=node_id, data_dir=data_dir, listen=[_loopback(port)]
        ).setServiceParent(top)
        nodes[node_id] = 1.0
    if sub["storage"] == "lmdb":
        log.info(
            "cluster data is in {path}; delete that directory to start empty",
            path=os.path.abspath(sub["data-dir"]),
        )
    make_proxy_service(
        reactor=reactor,
        nodes=nodes,
        listen=sub.endpoints(),
        max_value_bytes=sub["max-value-bytes"],
        timeout=sub["timeout"],
        access_log=sub["access-log"],
        writer_id=f"proxy-{sub['port']}",
    ).setServiceParent(top)
    return top
