"""Command-line options and the service tree they build, with no sockets.

Like Twisted's own C{twisted/web/test/test_tap.py}: parse options, call
C{makeService}, and inspect the tree. Listeners are started against a
L{MemoryReactor}, which records each C{listenTCP} call instead of binding.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceCollection
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from shardkv import tap
from shardkv.addresses import parse_nodes
from shardkv.node.service import NodeService
from shardkv.storage.memory import MemoryEngine
from shardkv.web.dataroutes import DEFAULT_MAX_VALUE_BYTES
from shardkv.web.listening import ListeningService
from shardkv.web.site import QuietSite
from tests.tlscerts import CA, speaks_tls

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
    C{tcp:8081:interface=127.0.0.1}, with a backlog that a burst of clients
    does not overflow.
    """
    options = parse("node", "--port", "8081", "--storage", "memory")
    assert options.subOptions.endpoints() == ["tcp:8081:interface=127.0.0.1:backlog=1024"]
    built = Built(options)
    assert built.listened() == [(8081, "127.0.0.1")]
    assert [backlog for _, _, backlog, _ in built.reactor.tcpServers] == [1024]


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
        ["--node-inflight-bytes", "0"],
        ["--node-inflight-bytes", "lots"],
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


@pytest.mark.parametrize(
    ("argv", "cap"), [([], 32 << 20), (["--node-inflight-bytes", "4096"], 4096)]
)
def test_proxy_node_inflight_bytes(
    argv: list[str], cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Each node gets at most 32 MiB of records in flight by default, and the
    option reaches the proxy's service factory.
    """
    options = parse("proxy", *argv)
    assert options.subOptions["node-inflight-bytes"] == cap
    seen: dict[str, Any] = {}
    monkeypatch.setattr(tap, "make_proxy_service", lambda **kwargs: seen.update(kwargs))
    tap.makeService(options, MemoryReactorClock())
    assert seen["node_inflight_bytes"] == cap


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


# -- TLS to the nodes ------------------------------------------------------------


def pem_ca(tmp_path: Any) -> str:
    """A CA certificate file, for options that only need a readable one."""
    return str(CA.create(tmp_path / "ca").pem)


def connections(service: IService, reactor: MemoryReactorClock) -> dict[int, bool]:
    """Start ``service`` on ``reactor`` (its health checks run at once): the port
    of each outgoing connection, and whether it speaks TLS."""
    service.startService()
    try:
        return {port: speaks_tls(factory, port) for _, port, factory, _, _ in reactor.tcpClients}
    finally:
        service.stopService()


def test_proxy_nodes_with_schemes() -> None:
    """
    If C{--nodes} names nodes as C{https://host:port}, C{http://host:port}
    or bare C{host:port}, with or without a weight, then each node's id is
    C{host:port} (placement does not change with the scheme) and its base
    URL keeps the scheme, C{http} when none is given.
    """
    sub = parse("proxy", "--nodes", "https://a:1=2, http://b:2,c:3=0.5,HTTPS://d:4").subOptions
    assert sub["nodes"] == {"a:1": 2.0, "b:2": 1.0, "c:3": 0.5, "d:4": 1.0}
    assert sub["node-urls"] == {
        "a:1": "https://a:1",
        "b:2": "http://b:2",
        "c:3": "http://c:3",
        "d:4": "https://d:4",
    }
    assert parse_nodes("https://a:1,b:2") == {"a:1": 1.0, "b:2": 1.0}
    assert parse("proxy").subOptions["node-urls"] == {n: f"http://{n}" for n in LOCAL_DEFAULT_NODES}


@pytest.mark.parametrize(
    "nodes",
    ["ftp://a:1", "https://", "https://a", "https://a:1/path", "https://a:1,a:1", "//a:1"],
)
def test_proxy_bad_node_urls(nodes: str) -> None:
    """
    If a node URL has another scheme, no port, a path, or names a node
    already listed under another scheme, then parsing raises
    L{usage.UsageError}.
    """
    with pytest.raises(usage.UsageError, match="--nodes"):
        parse("proxy", "--nodes", nodes)


def test_proxy_calls_https_nodes_over_tls(tmp_path: Any) -> None:
    """
    If the proxy is given an C{https://} node and an C{http://} one, then its
    health checks reach the first over TLS and the second in the clear.
    """
    options = parse(
        "proxy",
        "--nodes",
        "https://127.0.0.1:9443,http://127.0.0.1:9081",
        "--ca-file",
        pem_ca(tmp_path),
    )
    reactor = MemoryReactorClock()
    assert connections(tap.makeService(options, reactor), reactor) == {9443: True, 9081: False}


def test_node_ca_file_reaches_the_node_service(tmp_path: Any, monkeypatch: Any) -> None:
    """
    If a node is given C{--ca-file}, then L{make_node_service} gets that
    path as C{ca_file} (tests/node/test_service.py checks what it does with
    it); without it, C{None}.
    """
    seen: list[Any] = []
    monkeypatch.setattr(tap, "make_node_service", lambda **kwargs: seen.append(kwargs))
    ca = pem_ca(tmp_path)
    tap.makeService(parse("node", "--storage", "memory", "--ca-file", ca), MemoryReactor())
    tap.makeService(parse("node", "--storage", "memory"), MemoryReactor())
    assert [kwargs["ca_file"] for kwargs in seen] == [ca, None]


@pytest.mark.parametrize("subcommand", ["node", "proxy", "cluster"])
def test_bad_ca_file_refuses_to_start(subcommand: str, tmp_path: Any) -> None:
    """
    If C{--ca-file} names a missing file or one with no certificate, then
    parsing raises L{usage.UsageError} naming the file, so twistd refuses to
    start with one line.
    """
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for path in [str(tmp_path / "missing.pem"), str(garbage)]:
        with pytest.raises(usage.UsageError, match="--ca-file") as raised:
            parse(subcommand, "--ca-file", path)
        assert os.path.basename(path) in str(raised.value)
        assert "\n" not in str(raised.value)


def test_cluster_nodes_over_tls(tmp_path: Any) -> None:
    """
    If C{cluster} is given C{--node-cert}, C{--node-key} and C{--ca-file},
    then its nodes listen with TLS only and the proxy reaches them over TLS;
    C{--ca-file} alone, or a certificate without a key, is refused, since the
    cluster's nodes would be plain HTTP.
    """
    ca = CA.create(tmp_path / "ca")
    leaf = ca.issue("node")
    tls = ["--node-cert", str(leaf.cert), "--node-key", str(leaf.key), "--ca-file", str(ca.pem)]
    options = parse("cluster", "--node-ports", "9301,9302", "--storage", "memory", *tls)
    reactor = MemoryReactorClock()
    service = tap.makeService(options, reactor)
    for listener in listeners(service):
        listener.privilegedStartService()
    assert sorted(port for port, *_ in reactor.sslServers) == [9301, 9302]
    assert [port for port, *_ in reactor.tcpServers] == [8080]
    for listener in listeners(service):
        listener.stopService()
    assert connections(service, reactor) == {9301: True, 9302: True}
    for argv in [["--ca-file", str(ca.pem)], tls[:2] + tls[4:], tls[2:]]:
        with pytest.raises(usage.UsageError, match="--node-"):
            parse("cluster", *argv)


# -- tokens and protected mode (issue 12, section 1) -------------------------------

TOKEN = "cluster-token-0123456789abcdef"


@pytest.fixture
def token_file(tmp_path: Any) -> str:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    return str(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["node", "--listen", "tcp:0", "--node-id", "127.0.0.1:9"],
        ["node", "--listen", "tcp:8081:interface=0.0.0.0"],
        ["node", "--listen", "tcp:8081:interface=127.0.0.1", "--listen", "tcp6:8081"],
        ["proxy", "--listen", "tcp:8080"],
        ["cluster", "--listen", "tcp:8080:interface=0.0.0.0"],
    ],
)
def test_public_listen_without_a_token_is_refused(argv: list[str], token_file: str) -> None:
    """Protected mode: no public listener without --token-file; one line says how to fix it."""
    with pytest.raises(usage.UsageError) as caught:
        parse(*argv)
    message = str(caught.value)
    assert "\n" not in message
    assert "--token-file" in message
    assert "127.0.0.1" in message
    parsed = parse(*argv, "--token-file", token_file)
    assert parsed.subOptions["token"] == TOKEN


@pytest.mark.parametrize("subcommand", ["node", "proxy", "cluster"])
def test_loopback_needs_no_token(subcommand: str) -> None:
    options = parse(subcommand)
    assert options.subOptions["token"] is None


@pytest.mark.parametrize("option", ["--token-file", "--client-token-file"])
def test_bad_token_file_is_a_usage_error(option: str, tmp_path: Any) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(usage.UsageError, match=f"{option}: cannot read {missing}"):
        parse("proxy", option, str(missing))


def test_node_has_no_client_token_option(token_file: str) -> None:
    with pytest.raises(usage.UsageError):
        parse("node", "--client-token-file", token_file)


def test_tokens_reach_the_guards(token_file: str, tmp_path: Any) -> None:
    """
    In a cluster, each node's site wants the cluster token and shows the
    member list it was given; the proxy's data API wants the client token.
    """
    client = tmp_path / "client"
    client.write_text("client-token-0123456789abcdef")
    built = build(
        "cluster", "--storage", "memory", "--token-file", token_file,
        "--client-token-file", str(client),
    )  # fmt: skip
    answers = []
    for site in sites(built.service):
        stub: Any = StubTreq(site.resource)
        health = stub.get("http://127.0.0.1/health")
        data = stub.get("http://127.0.0.1/kv/k")
        stub.flush()
        health_body = json.loads(stub.content(health.result).result)
        answers.append((health_body.get("members"), data.result.code))
    members = ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]
    assert answers == [(members, 401)] * 3 + [(None, 401)]


# -- names from --listen, and a cluster that cannot have one of its ports (section 6) --


@pytest.mark.parametrize(
    ("endpoint", "node_id"),
    [
        ("tcp:9001:interface=127.0.0.2", "127.0.0.2:9001"),
        ("tcp:9001:interface=10.0.0.5", "10.0.0.5:9001"),
        ("tcp:9001", "db-3:9001"),
        ("tcp:9001:interface=0.0.0.0", "db-3:9001"),
        ("ssl:8443:privateKey=k.pem:certKey=c.pem:interface=10.0.0.6", "10.0.0.6:8443"),
        ("tcp6:9002:interface=\\:\\:1", "::1:9002"),
    ],
)
def test_node_id_from_listen(
    endpoint: str, node_id: str, token_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    If a node is given C{--listen} and no C{--port}, then it is named after
    the first endpoint's interface and port (the host name when it listens on
    every interface), and its data directory and pidfile after that port.
    """
    monkeypatch.setattr(socket, "gethostname", lambda: "db-3")
    options = parse(
        "node", "--listen", endpoint, "--listen", "tcp:7000", "--token-file", token_file
    )
    sub = options.subOptions
    port = int(node_id.rpartition(":")[2])
    assert sub["node-id"] == node_id
    assert sub["port"] == port
    assert sub["data-dir"] == os.path.join("shardkv-data", f"node-{port}")
    assert sub.endpoints() == [endpoint, "tcp:7000"]


def test_port_keeps_the_loopback_names() -> None:
    """
    If C{--port} is given beside C{--listen}, then the names stay those of
    the loopback port, as before (ids must not change under a running
    cluster).
    """
    sub = parse("node", "--listen", "tcp:9001:interface=127.0.0.2", "--port", "9005").subOptions
    assert (sub["node-id"], sub["port"]) == ("127.0.0.1:9005", 9005)
    proxy = parse("proxy", "--listen", "tcp:9001:interface=127.0.0.2", "--port", "9005")
    assert proxy.subOptions["proxy-id"] == "proxy-9005"
    assert parse("proxy").subOptions["proxy-id"] == "proxy-8080"


@pytest.mark.parametrize(
    ("endpoint", "proxy_id"),
    [
        ("tcp:9080:interface=127.0.0.2", "proxy-127.0.0.2:9080"),
        ("tcp:9080", "proxy-db-3:9080"),
        ("ssl:8443:privateKey=k.pem:interface=10.0.0.5", "proxy-10.0.0.5:8443"),
    ],
)
def test_proxy_id_from_listen(
    endpoint: str, proxy_id: str, token_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    If a proxy is given C{--listen} and no C{--port}, then its id names the
    first endpoint's host and port.
    """
    monkeypatch.setattr(socket, "gethostname", lambda: "db-3")
    options = parse("proxy", "--listen", endpoint, "--token-file", token_file)
    assert options.subOptions["proxy-id"] == proxy_id


@pytest.mark.parametrize("subcommand", ["node", "proxy"])
@pytest.mark.parametrize("endpoint", ["unix:/tmp/shardkv.sock", "tcp:0:interface=127.0.0.1"])
def test_endpoint_without_a_port_needs_an_id(subcommand: str, endpoint: str) -> None:
    """
    If the endpoint has no port to name the process after (a unix socket,
    port 0), then the id must be given: a one-line usage error says which
    option; with it, the node's data directory is named after its id.
    """
    option = f"--{subcommand}-id"
    with pytest.raises(usage.UsageError, match=option) as raised:
        parse(subcommand, "--listen", endpoint)
    assert "\n" not in str(raised.value) and endpoint in str(raised.value)
    sub = parse(subcommand, "--listen", endpoint, option, "here:1").subOptions
    assert sub[option[2:]] == "here:1"
    if subcommand == "node":
        assert sub["data-dir"] == os.path.join("shardkv-data", "node-here-1")


@pytest.mark.parametrize(
    "argv",
    [
        ["node", "--node-id", "a b"],
        ["node", "--node-id", "x" * 200],
        ["proxy", "--proxy-id", "p/1"],
        ["node", "--listen", "tcp:abc"],
        ["node", "--listen", "tcp:99999:interface=127.0.0.1"],
    ],
)
def test_unusable_ids_and_ports_are_usage_errors(argv: list[str]) -> None:
    """
    If an id cannot be carried in a version, or an endpoint's port is no
    port, then parsing refuses with one line instead of a traceback at start.
    """
    with pytest.raises(usage.UsageError) as raised:
        parse(*argv)
    assert "\n" not in str(raised.value)


class TakenPortReactor(MemoryReactor):
    """A memory reactor on which some ports are held by another process."""

    def __init__(self, taken: set[int]) -> None:
        super().__init__()
        self.taken = taken

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.taken:
            cause = OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
            raise CannotListenError(interface, port, cause)
        return super().listenTCP(port, factory, backlog, interface)


def test_cluster_with_a_taken_port_opens_no_engine(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    If one of a cluster's node ports is taken, then twistd's first step
    (privilegedStartService on the whole tree) exits with status 1 and one
    line naming the port, before any node has opened its data directory and
    before the ports after it are asked for. Every listener is a
    L{ListeningService}.
    """
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", terminal)
    options = parse(
        "cluster", "--node-ports", "9401,9402,9403", "--port", "9400", "--data-dir", str(tmp_path)
    )
    reactor = TakenPortReactor({9402})
    service = tap.makeService(options, reactor)
    assert len(listeners(service)) == 4
    assert all(isinstance(listener, ListeningService) for listener in listeners(service))
    with pytest.raises(SystemExit) as exited:
        service.privilegedStartService()
    assert exited.value.code == 1
    assert [port for port, *_ in reactor.tcpServers] == [9401]
    assert os.listdir(tmp_path) == [], "no node opened its data directory"
    assert not any(s.running for s in walk(service))
    lines = terminal.getvalue().splitlines()
    assert len(lines) == 1 and "port 9402 of 127.0.0.1" in lines[0], lines


@pytest.mark.parametrize(
    ("twistd", "echo"),
    [(["-n"], False), (["-n", "--logfile", "x.log"], True), ([], True)],
)
def test_echo_errors_follows_where_twistd_logs(twistd: list[str], echo: bool) -> None:
    """
    A refusal is printed besides being logged, except under C{twistd -n} with
    no log file, where the log is the terminal already.
    """
    options = twistd_options(*twistd, "shardkv", "node", "--port", "1")
    assert options.subOptions.subOptions.echo_errors() is echo


@pytest.mark.parametrize("sub", ["proxy", "cluster"])
def test_rebalance_rate(sub: str) -> None:
    """
    C{--rebalance-rate} (keys/s for the whole cluster) defaults to 0, unlimited,
    and must be a whole number of zero or more; a bad value names the option.
    """
    assert parse(sub).subOptions["rebalance-rate"] == 0
    assert parse(sub, "--rebalance-rate", "5000").subOptions["rebalance-rate"] == 5000
    for bad in ("-1", "fast", "1.5"):
        with pytest.raises(usage.UsageError, match="--rebalance-rate"):
            parse(sub, "--rebalance-rate", bad)
