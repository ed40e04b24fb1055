"""Command-line options and the service tree they build, with no sockets.

Like Twisted's own C{twisted/web/test/test_tap.py}: parse options, call
C{makeService}, and inspect the tree. Listeners are started against a
L{MemoryReactor}, which records each C{listenTCP} call instead of binding.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceCollection
from twisted.internet.testing import MemoryReactor
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from shardkv import tap
from shardkv.node.service import NodeService
from shardkv.storage.memory import MemoryEngine
from shardkv.web.dataroutes import DEFAULT_MAX_VALUE_BYTES
from shardkv.web.site import QuietSite

LOCAL_DEFAULT_NODES = {"127.0.0.1:8081": 1.0, "127.0.0.1:8082": 1.0, "127.0.0.1:8083": 1.0}


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def walk(service: IService) -> Iterator[IService]:
    """The service and every service below it, depth first."""
    yield service
    if IServiceCollection.providedBy(service):
        for child in service:
            yield from walk(child)


def listeners(service: IService) -> list[StreamServerEndpointService]:
    return [s for s in walk(service) if isinstance(s, StreamServerEndpointService)]


class Built:
    """A service tree made by C{makeService} on its own memory reactor."""

    def __init__(self, options: tap.Options) -> None:
        self.reactor = MemoryReactor()
        self.service = tap.makeService(options, self.reactor)

    def listened(self) -> list[tuple[int, str]]:
        """Start only the listeners: the (port, interface) pairs they asked the
        reactor for. Each must serve a L{QuietSite}."""
        for listener in listeners(self.service):
            listener.privilegedStartService()
        for _, factory, _, _ in self.reactor.tcpServers:
            assert isinstance(factory, QuietSite)
        return [(port, interface) for port, _, _, interface in self.reactor.tcpServers]


def build(*argv: str) -> Built:
    return Built(parse(*argv))


def sites(service: IService) -> list[Any]:
    return [listener.factory for listener in listeners(service)]


# -- node ------------------------------------------------------------------------


def test_node_port_is_loopback_tcp() -> None:
    """
    If a node is given C{--port 8081}, then it listens on exactly
    C{tcp:8081:interface=127.0.0.1}.
    """
    options = parse("node", "--port", "8081", "--storage", "memory")
    assert options.subOptions.endpoints() == ["tcp:8081:interface=127.0.0.1"]
    assert Built(options).listened() == [(8081, "127.0.0.1")]


def test_node_defaults() -> None:
    """
    If a node is given no options, then it listens on 127.0.0.1:8081, uses
    lmdb with fsync on every commit under ./shardkv-data/node-8081, and names
    itself after its address.
    """
    options = parse("node")
    sub = options.subOptions
    assert (sub["port"], sub["storage"], sub["durability"]) == (8081, "lmdb", "always")
    assert sub["node-id"] == "127.0.0.1:8081"
    assert sub["data-dir"] == os.path.join("shardkv-data", "node-8081")
    built = Built(options)
    service = built.service
    assert isinstance(service, NodeService)
    assert service.engine.name == "lmdb"  # built, not opened: startService opens it
    assert service.engine.path == os.path.abspath(sub["data-dir"])  # type: ignore[attr-defined]
    assert built.listened() == [(8081, "127.0.0.1")]


def test_node_data_dir_and_memory_storage(tmp_path: Any) -> None:
    """
    If a node is given C{--data-dir} the lmdb engine lives there; with
    C{--storage memory} the engine is the in-memory one.
    """
    service = build("node", "--port", "9001", "--data-dir", str(tmp_path / "d")).service
    assert isinstance(service, NodeService)
    assert service.engine.path == str(tmp_path / "d")  # type: ignore[attr-defined]
    memory = build("node", "--port", "9001", "--storage", "memory").service
    assert isinstance(memory, NodeService)
    assert isinstance(memory.engine, MemoryEngine)


def test_repeated_listen_gives_one_service_each() -> None:
    """
    If C{--listen} is given twice, then the tree holds one
    L{StreamServerEndpointService} per endpoint, and no default port.
    """
    built = build(
        "node",
        "--storage",
        "memory",
        "--listen",
        "tcp:9001:interface=127.0.0.1",
        "--listen",
        "tcp:9002:interface=127.0.0.1",
    )
    assert len(listeners(built.service)) == 2
    assert sorted(built.listened()) == [(9001, "127.0.0.1"), (9002, "127.0.0.1")]


def test_node_max_value_bytes_and_access_log() -> None:
    """
    If a node is given C{--max-value-bytes} and C{--access-log}, then its site
    limits C{/kv} bodies to that size and logs requests.
    """
    (site,) = sites(build("node", "--storage", "memory", "--max-value-bytes", "1000").service)
    assert site.requestFactory.body_limit(b"PUT", b"/kv/k") == 1000
    assert not site.access_log
    (site,) = sites(build("node", "--storage", "memory", "--access-log").service)
    assert site.requestFactory.body_limit(b"PUT", b"/kv/k") == DEFAULT_MAX_VALUE_BYTES
    assert site.access_log


@pytest.mark.parametrize(
    "argv",
    [
        ["--storage", "rocksdb"],
        ["--durability", "sometimes"],
        ["--port", "eighty"],
        ["--max-value-bytes", "0"],
        ["--max-value-bytes", "-5"],
        ["--no-such-option"],
    ],
)
def test_node_bad_options(argv: list[str]) -> None:
    """
    If a node is given an unknown storage engine, durability mode, a
    non-numeric port or a non-positive size, then parsing raises
    L{usage.UsageError}.
    """
    with pytest.raises(usage.UsageError):
        parse("node", *argv)


# -- proxy -----------------------------------------------------------------------


def test_proxy_defaults() -> None:
    """
    If the proxy is given no options, then it listens on 127.0.0.1:8080 and
    routes to the three local default nodes, 127.0.0.1:8081..8083.
    """
    options = parse("proxy")
    sub = options.subOptions
    assert sub["port"] == 8080
    assert sub["nodes"] == LOCAL_DEFAULT_NODES
    assert sub["timeout"] == 2.0
    assert Built(options).listened() == [(8080, "127.0.0.1")]


def test_proxy_nodes_with_weights() -> None:
    """
    If C{--nodes a:1=2,b:2} is given, then node C{a:1} has weight 2 and
    C{b:2} the default weight 1, in the order given.
    """
    sub = parse("proxy", "--nodes", "a:1=2,b:2").subOptions
    assert sub["nodes"] == {"a:1": 2.0, "b:2": 1.0}
    assert list(sub["nodes"]) == ["a:1", "b:2"]
    assert parse("proxy", "--nodes", " a:1 , b:2=0.5 ,").subOptions["nodes"] == {
        "a:1": 1.0,
        "b:2": 0.5,
    }


@pytest.mark.parametrize(
    "nodes",
    [
        "",
        ",",
        "a",
        "a:",
        ":80",
        "a:x",
        "a:1=0",
        "a:1=-2",
        "a:1=heavy",
        "a:1,a:1",
    ],
)
def test_proxy_bad_nodes(nodes: str) -> None:
    """
    If C{--nodes} is empty, lacks a numeric port, has a non-positive or
    non-numeric weight, or lists a node twice, then parsing raises
    L{usage.UsageError}.
    """
    with pytest.raises(usage.UsageError):
        parse("proxy", "--nodes", nodes)


@pytest.mark.parametrize(
    "argv",
    [
        ["--timeout", "-1"],
        ["--timeout", "0"],
        ["--timeout", "soon"],
        ["--vnodes", "0"],
        ["--pool-size", "-3"],
        ["--health-interval", "0"],
        ["--pipeline-depth", "-1"],
        ["--pipeline-depth", "two"],
    ],
)
def test_proxy_bad_numbers(argv: list[str]) -> None:
    """
    If a proxy timeout, vnode count, pool size or health interval is not a
    positive number, or the pipeline depth is negative or not a number,
    then parsing raises L{usage.UsageError}.
    """
    with pytest.raises(usage.UsageError):
        parse("proxy", *argv)


def test_proxy_timeout_and_listen() -> None:
    """
    If the proxy is given C{--timeout 0.5} and a C{--listen} endpoint, then
    the timeout is a float and only that endpoint is listened on.
    """
    options = parse("proxy", "--timeout", "0.5", "--listen", "tcp:9100:interface=127.0.0.1")
    assert options.subOptions["timeout"] == 0.5
    assert Built(options).listened() == [(9100, "127.0.0.1")]


@pytest.mark.parametrize(("argv", "depth"), [([], 1), (["--pipeline-depth", "0"], 0)])
def test_proxy_pipeline_depth(argv: list[str], depth: int) -> None:
    """
    The proxy batches replica operations with one batch in flight per node
    by default, and C{--pipeline-depth 0} (one request per operation) is
    accepted.
    """
    assert parse("proxy", *argv).subOptions["pipeline-depth"] == depth


# -- cluster and the top level -----------------------------------------------------


def test_cluster_builds_three_nodes_and_a_proxy(tmp_path: Any) -> None:
    """
    If C{cluster} is run with defaults, then the tree holds three node
    services on 8081..8083 and a proxy on 8080 that routes to them, each node
    with its own data directory.
    """
    built = build("cluster", "--data-dir", str(tmp_path))
    nodes = [s for s in walk(built.service) if isinstance(s, NodeService)]
    assert len(nodes) == 3
    paths = sorted(n.engine.path for n in nodes)  # type: ignore[attr-defined]
    assert paths == [str(tmp_path / f"node-{p}") for p in (8081, 8082, 8083)]
    assert sorted(built.listened()) == [(p, "127.0.0.1") for p in (8080, 8081, 8082, 8083)]


def test_cluster_ports_and_memory() -> None:
    """
    If C{cluster} is given C{--port} and C{--node-ports}, then it listens on
    exactly those; C{--storage memory} gives every node a memory engine.
    """
    built = build("cluster", "--port", "9200", "--node-ports", "9201,9202", "--storage", "memory")
    nodes = [s for s in walk(built.service) if isinstance(s, NodeService)]
    assert [type(n.engine) for n in nodes] == [MemoryEngine, MemoryEngine]
    assert sorted(built.listened()) == [
        (9200, "127.0.0.1"),
        (9201, "127.0.0.1"),
        (9202, "127.0.0.1"),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--node-ports", "a,b"],
        ["--node-ports", ","],
        ["--storage", "disk"],
        ["--durability", "never"],
        ["--timeout", "-1"],
    ],
)
def test_cluster_bad_options(argv: list[str]) -> None:
    """
    If C{cluster} is given bad node ports, storage, durability or timeout,
    then parsing raises L{usage.UsageError}.
    """
    with pytest.raises(usage.UsageError):
        parse("cluster", *argv)


def test_no_subcommand() -> None:
    """
    If no subcommand is given, then parsing raises L{usage.UsageError}
    naming the choices.
    """
    with pytest.raises(usage.UsageError, match="node"):
        parse()
    with pytest.raises(usage.UsageError):
        parse("gateway")


# -- the pidfile clash fix -------------------------------------------------------


def twistd_options(*argv: str) -> ServerOptions:
    options = ServerOptions()
    options.parseOptions(list(argv))
    return options


@pytest.mark.parametrize("subcommand", ["node", "proxy", "cluster"])
def test_nodaemon_writes_no_pidfile(subcommand: str) -> None:
    """
    If twistd runs C{-n shardkv <subcommand>} without C{--pidfile}, then the
    pidfile is cleared, so servers started from one directory do not clash.
    """
    options = twistd_options("-n", "shardkv", subcommand, "--port", "1")
    assert options["nodaemon"]
    assert options["pidfile"] == ""


def test_daemon_gets_a_pidfile_per_port() -> None:
    """
    If twistd daemonizes C{shardkv node --port 1}, then its pidfile is named
    after the subcommand and port rather than the shared C{twistd.pid}.
    """
    options = twistd_options("shardkv", "node", "--port", "1")
    assert options["pidfile"] == os.path.abspath("shardkv-node-1.pid")
    other = twistd_options("shardkv", "proxy", "--port", "2")
    assert other["pidfile"] == os.path.abspath("shardkv-proxy-2.pid")


def test_daemon_default_port_pidfile() -> None:
    """
    If twistd daemonizes C{shardkv node} with no port, then the pidfile is
    named after the default port.
    """
    assert twistd_options("shardkv", "node")["pidfile"] == os.path.abspath("shardkv-node-8081.pid")


@pytest.mark.parametrize("nodaemon", [[], ["-n"]])
def test_explicit_pidfile_is_kept(nodaemon: list[str]) -> None:
    """
    If the user chooses a pidfile, then it is kept as given, daemon or not.
    """
    options = twistd_options(*nodaemon, "--pidfile", "mine.pid", "shardkv", "node", "--port", "1")
    assert options["pidfile"] == os.path.abspath("mine.pid")
