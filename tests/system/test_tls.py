"""TLS between the proxy and the nodes, with real twistd processes.

Every node here listens with TLS only (``--listen ssl:...``, no plain port), on
a certificate from a CA made for the test (L{tests.tlscerts}); the proxy is
given ``--nodes https://...`` and ``--ca-file``. The proxy itself serves
clients in plain HTTP on loopback, so the data goes through the package's
client as in every other system test. Node health is polled over https with
the standard library's ``ssl`` (the test's own CA, and for nodes whose
certificate the proxy must refuse, the CA that did issue it), so a node
marked down is known to be up and refused only for its certificate.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardkv.client.blocking import request
from shardkv.core.placement import Ring
from shardkv.testing.polling import HOST, free_port, poll_until
from shardkv.testing.processes import STARTUP_DEADLINE, Proc, ProcessSet
from tests.system.procs import process_set
from tests.tlscerts import CA, Leaf

pytestmark = pytest.mark.slow

DEADLINE = 10.0
"""Seconds for the proxy to see a node's state change, or hints to be delivered."""


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA.create(tmp_path / "pki", "shardkv cluster CA")


def https_get(port: int, path: str, trust: Path, check_hostname: bool = True) -> bytes:
    """``GET https://127.0.0.1:port/path``, trusting only ``trust``; the body of a 200."""
    context = ssl.create_default_context(cafile=str(trust))
    context.check_hostname = check_hostname
    connection = http.client.HTTPSConnection(HOST, port, timeout=2.0, context=context)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 200, (response.status, body)
    return body


class TLSNode:
    """A node process that listens with TLS only on ``port``."""

    def __init__(self, proc: Proc, port: int, trust: Path, check_hostname: bool = True) -> None:
        self.proc = proc
        self.port = port
        self.trust = trust
        self.check_hostname = check_hostname

    @property
    def id(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.id}"

    def health(self) -> Any:
        return json.loads(https_get(self.port, "/health", self.trust, self.check_hostname))

    def wait_healthy(self) -> Any:
        return poll_until(
            lambda: self.health()["status"] == "ok" and self.health(),
            STARTUP_DEADLINE,
            f"{self.proc.name} to answer /health over TLS",
            alive=self.proc.check_running,
        )

    def restart(self) -> None:
        self.proc.restart(wait=False)
        self.wait_healthy()


def start_tls_node(
    procs: ProcessSet,
    leaf: Leaf,
    ca: CA,
    *,
    trust: Path | None = None,
    check_hostname: bool = True,
    name: str = "node",
) -> TLSNode:
    """A TLS-only node that trusts ``ca`` for its peers; health polled trusting ``trust``."""
    port = free_port()
    proc = procs.start(
        name,
        "node",
        "--listen",
        leaf.listen(port),
        "--node-id",
        f"{HOST}:{port}",
        "--storage",
        "memory",
        "--ca-file",
        str(ca.pem),
    )
    node = TLSNode(proc, port, trust or ca.pem, check_hostname)
    node.wait_healthy()
    return node


def cluster_nodes(proxy: Proc) -> dict[str, Any]:
    reply = request("GET", proxy.url + "/cluster")
    assert reply.status == 200, reply
    return {entry["node"]: entry for entry in reply.json()["nodes"]}


def wait_statuses(proxy: Proc, expected: dict[str, str]) -> dict[str, Any]:
    def check() -> dict[str, Any]:
        nodes = cluster_nodes(proxy)
        seen = {node: nodes[node]["health"]["status"] for node in expected}
        assert seen == expected, seen
        return nodes

    return poll_until(check, DEADLINE, f"the proxy to show {expected}")


def test_tls_cluster_end_to_end_with_hinted_handoff(procs: ProcessSet, ca: CA) -> None:
    """
    If four nodes listen with TLS only on certificates from the cluster's CA,
    and the proxy names them ``https://`` with that CA, then every node is up
    in /cluster (under its ``host:port`` id), writes and reads through the
    proxy work, and hinted handoff works node to node over TLS: a key written
    while one of its home replicas is down is held as a hint by the fourth node and
    reaches the home replica once it is back.
    """
    leaf = ca.issue("node")
    nodes = [start_tls_node(procs, leaf, ca, name=f"node{i}") for i in (1, 2, 3, 4)]
    proxy = procs.start_proxy(None, [n.url for n in nodes], "--ca-file", str(ca.pem))
    listed = wait_statuses(proxy, {n.id: "up" for n in nodes})
    assert sorted(listed) == sorted(n.id for n in nodes)

    for i in range(20):
        assert request("PUT", f"{proxy.url}/kv/tls-{i}", f"value-{i}").status in (200, 201)
    for i in range(20):
        reply = request("GET", f"{proxy.url}/kv/tls-{i}")
        assert (reply.status, reply.body) == (200, f"value-{i}".encode())

    victim = nodes[2]
    ring = Ring([n.id for n in nodes])
    candidates = [f"hinted-{i}" for i in range(40)]
    keys = [k for k in candidates if victim.id in ring.preference_list(k, 3)][:5]
    assert keys

    victim.proc.kill()
    wait_statuses(proxy, {victim.id: "down"})
    for key in keys:
        assert request("PUT", f"{proxy.url}/kv/{key}", f"for-{key}").status in (200, 201)
    poll_until(
        lambda: cluster_nodes(proxy)[victim.id]["hints_waiting"] >= len(keys),
        DEADLINE,
        "the other nodes to hold the hints for the victim",
    )

    victim.restart()
    wait_statuses(proxy, {victim.id: "up"})

    def delivered() -> bool:
        waiting = cluster_nodes(proxy)[victim.id]["hints_waiting"]
        assert waiting == 0, f"{waiting} hints still waiting"
        for key in keys:
            assert https_get(victim.port, f"/kv/{key}", ca.pem) == f"for-{key}".encode()
        return True

    poll_until(delivered, DEADLINE, "the hints to reach the restarted node over TLS")


def test_certificates_from_another_ca_or_for_another_host_are_refused(
    procs: ProcessSet, ca: CA, tmp_path: Path
) -> None:
    """
    If one node's certificate comes from another CA, and another's from the
    cluster's CA but for another host, then the proxy marks both down though
    each answers /health over TLS (checked here with the CA that issued it,
    or without the host check), keeps the node with a good certificate up,
    and writes and reads that need two replicas fail with
    ``503 insufficient_replicas``.
    """
    other = CA.create(tmp_path / "other-pki", "some other CA")
    good = start_tls_node(procs, ca.issue("good"), ca, name="good")
    foreign = start_tls_node(procs, other.issue("foreign"), ca, trust=other.pem, name="foreign")
    wrong = ca.issue("wrong", ("node.example", "10.9.9.9"))
    misnamed = start_tls_node(procs, wrong, ca, check_hostname=False, name="misnamed")
    nodes = [good, foreign, misnamed]
    proxy = procs.start_proxy(None, [n.url for n in nodes], "--ca-file", str(ca.pem))

    wait_statuses(proxy, {good.id: "up", foreign.id: "down", misnamed.id: "down"})
    for reply in [
        request("PUT", f"{proxy.url}/kv/refused", "value"),
        request("GET", f"{proxy.url}/kv/refused"),
    ]:
        assert reply.status == 503, reply
        assert reply.json()["error"] == "insufficient_replicas", reply
    assert wait_statuses(proxy, {foreign.id: "down", misnamed.id: "down"})
