"""The command-line options of ``twistd shardkv node|proxy|cluster``, one class each.

Parsing checks everything it can before a service exists (ports, numbers,
token and CA files, protected mode), so a mistake is a usage error naming
the option. L{shardkv.tap} turns the parsed options into the service tree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import quoteStringArgument
from twisted.logger import Logger
from twisted.python import usage

from shardkv.addresses import parse_node_urls, parse_nodes
from shardkv.config import ConfigFileOption
from shardkv.core.versions import VersionClock, VersionError
from shardkv.logs import LOG_LEVELS
from shardkv.proxy.service import DEFAULT_PIPELINE_DEPTH
from shardkv.replica.client import DEFAULT_NODE_INFLIGHT_BYTES
from shardkv.storage.durability import check_durability
from shardkv.web.auth import TokenFileError, load_token, loopback_endpoint
from shardkv.web.dataroutes import DEFAULT_MAX_VALUE_BYTES
from shardkv.web.httpclient import load_ca_certificates
from shardkv.web.listening import address_name, echo_needed
from shardkv.web.site import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    NODE_MAX_INFLIGHT_BYTES,
    PROXY_MAX_INFLIGHT_BYTES,
)

DEFAULT_PROXY_PORT = 8080
DEFAULT_NODE_PORTS = (8081, 8082, 8083)
DEFAULT_DATA_ROOT = "shardkv-data"

log = Logger(namespace="shardkv")


LISTEN_BACKLOG = 1024
"""Connections the kernel queues before they are accepted. Twisted's default
of 50 overflows in a burst of clients; the kernel then drops their handshakes
and resets some of them about a second later."""


def _loopback(port: int) -> str:
    return f"tcp:{port}:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"


def _named(
    kind: type, name: str, doc: str, check: Callable[[Any], str | None]
) -> Callable[[str], Any]:
    """A coercer whose every error names the option (twistd would print only
    ``invalid literal for int()``). It raises L{usage.UsageError}, which
    L{usage.Options} passes through as it is; ``kind`` tells L{shardkv.config}
    which TOML type the option takes."""
    what = "a whole number" if kind is int else "a number"

    def coerce(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"{name} must be {what}, not {text!r}") from None
        problem = check(value)
        if problem is not None:
            raise usage.UsageError(f"{name} must be {problem}, not {text}")
        return value

    coerce.coerceDoc = doc  # type: ignore[attr-defined]
    coerce.kind = kind  # type: ignore[attr-defined]
    return coerce


def _positive(kind: type, name: str, allow_zero: bool = False) -> Callable[[str], Any]:
    """A coercer for numbers above zero (or at least zero)."""
    if allow_zero:
        return _named(kind, name, "Zero or more.", lambda v: "zero or more" if v < 0 else None)
    return _named(kind, name, "Must be positive.", lambda v: "positive" if v <= 0 else None)


def _integer(name: str) -> Callable[[str], Any]:
    return _named(int, name, "", lambda v: None)


def _port(name: str) -> Callable[[str], Any]:
    return _named(
        int, name, "", lambda v: "a port number (0 to 65535)" if not 0 <= v <= 65535 else None
    )


LOG_FORMATS = ("text", "json")

MAX_WORKERS = 64
SHAREABLE_KINDS = ("tcp", "tcp6", "ssl")
"""Endpoint types whose socket ``--workers`` can share: the parent listens and each
worker adopts the socket (L{shardkv.proxy.workers}). A unix socket is left out:
Twisted unlinks its path when any one adopting process stops listening."""


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"--workers must be a whole number, not {text!r}") from None
    if not 1 <= value <= MAX_WORKERS:
        raise usage.UsageError(f"--workers must be between 1 and {MAX_WORKERS}, not {text}")
    return value


_workers.coerceDoc = f"1 to {MAX_WORKERS}."  # type: ignore[attr-defined]
_workers.kind = int  # type: ignore[attr-defined]


class _ServerOptions(ConfigFileOption):
    """What every server subcommand shares: the config file, where to listen, limits and logs."""

    default_port = 0
    optFlags = [
        ["access-log", None, "Log every request (costs about 20 % of throughput)."],
    ]
    optParameters: list[list[Any]] = [
        [
            "token-file",
            None,
            None,
            "File holding the cluster token, the same on every node and proxy; without it "
            "the process listens on loopback only and serves node routes to loopback peers only.",
        ],
        [
            "header-timeout",
            None,
            DEFAULT_HEADER_TIMEOUT,
            "Seconds a request's headers may take to arrive (from the connection's start for "
            "its first request); then 408 and close.",
            _positive(float, "--header-timeout"),
        ],
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Live client connections per server; past it new ones are closed at once.",
            _positive(int, "--max-connections"),
        ],
        [
            "max-inflight-bytes",
            None,
            None,
            f"Request-body bytes held at once; past it 503 overloaded (default "
            f"{PROXY_MAX_INFLIGHT_BYTES >> 20} MiB on a proxy, "
            f"{NODE_MAX_INFLIGHT_BYTES >> 20} MiB on a node)",
            _positive(int, "--max-inflight-bytes"),
        ],
        [
            "log-format",
            None,
            "text",
            "text: twistd's lines; json: one JSON object per line (time, level, namespace, "
            "text, fields).",
        ],
        ["log-level", None, "info", f"Least level logged: {', '.join(LOG_LEVELS)}."],
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
        for option, choices in (("log-format", LOG_FORMATS), ("log-level", LOG_LEVELS)):
            if self[option] not in choices:
                raise usage.UsageError(f"--{option} must be one of {', '.join(choices)}")
        self._port_given = self["port"] is not None
        if self["port"] is None:
            self["port"] = self.default_port
        self.address = self._address()
        self._load_tokens()
        if self.get("ca-file") is not None:
            try:
                load_ca_certificates(self["ca-file"])
            except ValueError as e:
                raise usage.UsageError(f"--ca-file: {e}") from None

    def _address(self) -> tuple[str, int] | None:
        """``(host, port)`` this process is named after: 127.0.0.1 and --port, or, with
        --listen and no --port, the first endpoint's interface and port (the host name
        when it listens on every interface), whose port then also names the default data
        directory and pidfile. None when that endpoint has no port (a unix socket).
        """
        if not self["listen"] or self._port_given:
            return "127.0.0.1", self["port"]
        try:
            address = address_name(self["listen"][0])
        except ValueError as e:
            raise usage.UsageError(f"--listen: {e}") from None
        if address is not None:
            self["port"] = address[1]
        return address

    def _checked_id(self, option: str, name: str | None, writer: str = "{}") -> str:
        """``name``, or ``host:port`` of L{_address}; refused unless versions can carry it."""
        if name is None:
            if self.address is None:
                raise usage.UsageError(
                    f"--listen {self['listen'][0]} has no port to name this process after; "
                    f"give {option}"
                )
            name = "{}:{}".format(*self.address)
        try:
            VersionClock(writer.format(name), lambda: 0)
        except VersionError:
            raise usage.UsageError(
                f"{option}: {name!r} is not a usable id (letters, digits, '.', '_', ':', '-'; "
                "at most 120 characters); give one"
            ) from None
        return name

    def echo_errors(self) -> bool:
        """Whether a refusal to start is printed besides being logged (see L{echo_needed})."""
        return echo_needed(getattr(getattr(self, "parent", None), "parent", None))

    def _load_tokens(self) -> None:
        """Read the token files now, and refuse a public listener without a cluster token."""
        for option, key in (("token-file", "token"), ("client-token-file", "client-token")):
            path = self.get(option)
            try:
                self[key] = None if path is None else load_token(path, f"--{option}")
            except TokenFileError as e:
                raise usage.UsageError(str(e)) from None
        if self["token"] is not None:
            return
        for endpoint in self.endpoints():
            if not loopback_endpoint(endpoint):
                raise usage.UsageError(
                    f"--listen {endpoint} may accept connections from other machines and no "
                    "--token-file is set (protected mode); give every node and proxy "
                    "--token-file FILE with one shared secret, or listen on "
                    "tcp:PORT:interface=127.0.0.1"
                )


class _ClientTokenOption(usage.Options):
    optParameters: list[list[Any]] = [
        [
            "client-token-file",
            None,
            None,
            "File holding a token that clients must send (Authorization: Bearer) to use the "
            "data API, /cluster and /explain (default: the data API is open).",
        ],
    ]


class _StorageOptions(_ServerOptions):
    """What a node keeps and how: the storage options of ``node`` and ``cluster``."""

    optParameters: list[list[Any]] = [
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
        [
            "clock-offset-ms",
            None,
            0,
            "Skew this node's wall clock (for testing).",
            _integer("--clock-offset-ms"),
        ],
        [
            "ca-file",
            None,
            None,
            "PEM file of the CAs that peers' certificates must chain to; with it, this node "
            "hands hints to its peers over https (a cluster is all TLS or not).",
        ],
    ]

    def _check_storage(self) -> None:
        if self["storage"] not in ("lmdb", "memory"):
            raise usage.UsageError("--storage must be lmdb or memory")
        try:
            check_durability(self["durability"])
        except ValueError as e:
            raise usage.UsageError(f"--durability: {e}") from None


class NodeOptions(_StorageOptions):
    synopsis = "[options]"
    longdesc = (
        "Run one storage node. It serves the data API (/set, /get, /kv/{key}) and "
        "/health, and keeps its records in an embedded database under --data-dir."
    )
    default_port = DEFAULT_NODE_PORTS[0]
    optParameters: list[list[Any]] = [
        [
            "port",
            "p",
            None,
            "TCP port on 127.0.0.1 (default 8081); --listen for others.",
            _port("--port"),
        ],
        [
            "node-id",
            None,
            None,
            "Name of this node in versions and errors; keep it stable across restarts and "
            "unique in the cluster. Default 127.0.0.1:PORT with --port; with --listen alone, "
            "the first endpoint's interface and port (tcp:9001:interface=10.0.0.5 gives "
            "10.0.0.5:9001, tcp:9001 on every interface gives HOSTNAME:9001: give --node-id "
            "if the host name changes); required for an endpoint without a port.",
        ],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self._check_storage()
        self["node-id"] = self._checked_id("--node-id", self["node-id"])
        if self["data-dir"] is None:
            name = self["port"] if self.address else self["node-id"].replace(":", "-")
            self["data-dir"] = os.path.join(DEFAULT_DATA_ROOT, f"node-{name}")


class _ReplicationOptions(usage.Options):
    """How the proxy replicates and moves data: the proxy's and ``cluster``'s options."""

    optParameters: list[list[Any]] = [
        [
            "timeout",
            None,
            2.0,
            "Seconds to wait for a node before answering 504.",
            _positive(float, "--timeout"),
        ],
        [
            "pipeline-depth",
            None,
            DEFAULT_PIPELINE_DEPTH,
            "Replica batches in flight per node; 0 sends one request per operation.",
            _positive(int, "--pipeline-depth", allow_zero=True),
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
        [
            "rebalance-rate",
            None,
            0,
            "Keys per second a membership change may move, for the whole cluster "
            "(0: unlimited); caps the move so foreground latency stays bounded.",
            _positive(int, "--rebalance-rate", allow_zero=True),
        ],
    ]

    def _check_quorums(self) -> None:
        if self["r"] > self["replicas"] or self["w"] > self["replicas"]:
            raise usage.UsageError("--r and --w must not exceed --replicas")


class ProxyOptions(_ClientTokenOption, _ReplicationOptions, _ServerOptions):
    synopsis = "[options]"
    longdesc = (
        "Run the routing proxy. It places each key on a node by consistent hashing and "
        "forwards the request; /cluster and /explain?key= show the placement."
    )
    default_port = DEFAULT_PROXY_PORT
    optParameters: list[list[Any]] = [
        [
            "port",
            "p",
            None,
            "TCP port on 127.0.0.1 (default 8080); --listen for others.",
            _port("--port"),
        ],
        [
            "nodes",
            None,
            ",".join(f"127.0.0.1:{p}" for p in DEFAULT_NODE_PORTS),
            "Comma-separated nodes, [http[s]://]host:port[=weight]; http when no scheme.",
        ],
        [
            "vnodes",
            None,
            None,
            "Ring points per unit of weight (default: the ring's).",
            _positive(int, "--vnodes"),
        ],
        [
            "pool-size",
            None,
            64,
            "Persistent connections kept per node.",
            _positive(int, "--pool-size"),
        ],
        [
            "node-inflight-bytes",
            None,
            DEFAULT_NODE_INFLIGHT_BYTES,
            "Record bytes in flight to each node; past it writes answer 503 overloaded.",
            _positive(int, "--node-inflight-bytes"),
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
            "proxy-id",
            None,
            None,
            "Name of this proxy in the versions it mints. Default proxy-PORT with --port; "
            "with --listen alone, proxy-HOST:PORT of the first endpoint (HOSTNAME when it "
            "listens on every interface); required for an endpoint without a port.",
        ],
        [
            "clock-offset-ms",
            None,
            0,
            "Skew this proxy's wall clock (for testing).",
            _integer("--clock-offset-ms"),
        ],
        [
            "ca-file",
            None,
            None,
            "PEM file of the CAs that https:// nodes' certificates must chain to "
            "(default: the system's trust store).",
        ],
        [
            "workers",
            None,
            1,
            "Proxy processes serving the same port(s), each a full proxy, supervised by this "
            "one (1: this process alone, as without the option); tcp, tcp6 and ssl listeners.",
            _workers,
        ],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self._check_workers()
        self["node-urls"] = parse_node_urls(self["nodes"])
        self["nodes"] = parse_nodes(self["nodes"])
        self._check_quorums()
        if self["proxy-id"] is None and self["listen"] and not self._port_given:
            self["proxy-id"] = "proxy-" + self._checked_id("--proxy-id", None)
        elif self["proxy-id"] is None:
            self["proxy-id"] = f"proxy-{self['port']}"
        self._checked_id("--proxy-id", self["proxy-id"], "{}.000000")

    def _check_workers(self) -> None:
        """Refuse ``--workers`` with a listener whose socket cannot be shared."""
        if self["workers"] == 1:
            return
        for endpoint in self.endpoints():
            kind = endpoint.split(":", 1)[0].strip().lower()
            if kind not in SHAREABLE_KINDS:
                raise usage.UsageError(
                    f"--workers {self['workers']} shares only {', '.join(SHAREABLE_KINDS)} "
                    f"listeners, not --listen {endpoint}; use --workers 1 for it"
                )


class ClusterOptions(_ClientTokenOption, _ReplicationOptions, _StorageOptions):
    synopsis = "[options]"
    longdesc = (
        "Run a whole local cluster in one process for trying shardkv out: three nodes "
        "on 127.0.0.1:8081-8083 and the proxy on 127.0.0.1:8080, like `consul agent -dev`."
    )
    default_port = DEFAULT_PROXY_PORT
    optParameters: list[list[Any]] = [
        ["port", "p", None, "Proxy port on 127.0.0.1 (default 8080).", _port("--port")],
        [
            "node-ports",
            None,
            ",".join(map(str, DEFAULT_NODE_PORTS)),
            "Comma-separated node ports on 127.0.0.1.",
        ],
        ["data-dir", None, None, f"Root for node data (default ./{DEFAULT_DATA_ROOT})."],
        [
            "node-cert",
            None,
            None,
            "PEM certificate the nodes serve (for 127.0.0.1); with it they speak TLS only.",
        ],
        ["node-key", None, None, "PEM private key for --node-cert."],
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
        self._check_quorums()
        if self["data-dir"] is None:
            self["data-dir"] = DEFAULT_DATA_ROOT
        if (self["node-cert"] is None) != (self["node-key"] is None):
            raise usage.UsageError("--node-cert and --node-key go together")
        if self["ca-file"] is not None and self["node-cert"] is None:
            raise usage.UsageError("--ca-file needs --node-cert and --node-key in a cluster")

    def node_endpoint(self, port: int) -> str:
        """A node's listener: plain loopback TCP, or TLS only with --node-cert."""
        if self["node-cert"] is None:
            return _loopback(port)
        key, cert = quoteStringArgument(self["node-key"]), quoteStringArgument(self["node-cert"])
        return f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
