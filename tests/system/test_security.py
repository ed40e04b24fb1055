"""Who may talk to a node, against real ``twistd`` processes (issue 12, section 1).

The issue's attacks, replayed against nodes started with a cluster token:
a forged-version PUT and a tombstone PUT straight to a node, and a hint for
an address of the attacker's choosing (SSRF), watched by a TCP listener on
that address. Then protected mode (no public listener without a token),
hinted handoff working end to end with a token, and a search for the token
in every log and answer.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from shardkv.client.api import Reply
from shardkv.client.blocking import request as send
from shardkv.testing.polling import free_port, poll_until
from shardkv.testing.processes import Proc, ProcessSet
from tests.system.procs import process_set

pytestmark = pytest.mark.slow

TOKEN = "s3cret-7f1c9a0b5e2d4c6a8b0d2f4e6a8c0e2b"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WRONG = {"Authorization": "Bearer not-the-token-not-the-token"}
FORGED = {"X-Shardkv-Version": "1000000-1-attacker", "Content-Type": "text/plain"}
DEADLINE = 10.0


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "cluster.token"
    path.write_text(TOKEN + "\n")
    return str(path)


def addr(proc: Proc) -> str:
    return f"127.0.0.1:{proc.port}"


class Cluster:
    """Three nodes and a proxy, all with the token; every answer seen is kept."""

    def __init__(self, procs: ProcessSet, token_file: str) -> None:
        self.procs = procs
        self.nodes = [
            procs.start_node(None, None, "--storage", "memory", "--token-file", token_file)
            for _ in range(3)
        ]
        self.proxy = procs.start_proxy(None, self.nodes, "--token-file", token_file)
        self.bodies: list[bytes] = []
        self.members = sorted(addr(n) for n in self.nodes)
        for node in self.nodes:
            self.wait_members(node)

    def send(self, method: str, url: str, body: bytes | None = None, **kw: Any) -> Reply:
        reply = send(method, url, body, **kw)
        self.bodies.append(reply.body)
        return reply

    def wait_members(self, node: Proc) -> None:
        """Until the proxy has told ``node`` the members (within a health interval)."""

        def told() -> bool:
            reply = self.send("GET", node.url + "/health")
            assert reply.json()["members"] == self.members, reply.json()
            return True

        poll_until(told, DEADLINE, f"{node.name} to learn the members")

    def statuses(self) -> dict[str, str]:
        reply = self.send("GET", self.proxy.url + "/cluster", headers=AUTH)
        assert reply.status == 200, reply
        return {n["node"]: n["health"]["status"] for n in reply.json()["nodes"]}

    def wait_status(self, node: Proc, status: str) -> None:
        def seen() -> bool:
            assert self.statuses()[addr(node)] == status
            return True

        poll_until(seen, DEADLINE, f"/cluster to show {node.name} {status}")

    def assert_token_nowhere(self) -> None:
        """Not in any log, nor in any answer this test saw (/health, /cluster, errors)."""
        for proc in [*self.nodes, self.proxy]:
            self.bodies.append(self.send("GET", proc.url + "/health").body)
        self.bodies.append(self.send("GET", self.proxy.url + "/cluster", headers=AUTH).body)
        secret = TOKEN.encode()
        for body in self.bodies:
            assert secret not in body, body
        for proc in [*self.nodes, self.proxy]:
            for path in (proc.log_path, proc.out_path):
                if path.exists():
                    assert secret not in path.read_bytes(), path


def test_forged_versions_and_tombstones_need_the_token(procs: ProcessSet, token_file: str) -> None:
    """
    The issue's first attack: without the token a forged-version PUT (or a
    tombstone) to a node's /replica/kv is a 401, with a wrong token a 403,
    and every proxy read still returns the real value.
    """
    c = Cluster(procs, token_file)
    assert c.send("PUT", c.proxy.url + "/kv/victim", b"real").status == 201
    for node in c.nodes:
        for headers in [FORGED, {**FORGED, "X-Shardkv-Tombstone": "1"}]:
            url = node.url + "/replica/kv/victim"
            reply = c.send("PUT", url, b"evil", headers=headers)
            assert (reply.status, reply.json()["error"]) == (401, "unauthorized"), reply
            assert reply.headers["www-authenticate"].startswith("Bearer")
            reply = c.send("PUT", url, b"evil", headers={**headers, **WRONG})
            assert (reply.status, reply.json()["error"]) == (403, "forbidden"), reply
        for method, path in [("GET", "/kv/victim"), ("DELETE", "/kv/victim")]:
            assert c.send(method, node.url + path).status == 401
    for _ in range(20):
        reply = c.send("GET", c.proxy.url + "/kv/victim")
        assert (reply.status, reply.body) == (200, b"real"), reply
    c.assert_token_nowhere()


def test_hint_for_a_non_member_is_refused_and_never_sent(
    procs: ProcessSet, token_file: str
) -> None:
    """
    The issue's SSRF: even with the token, a hint for an address outside the
    cluster (or the made-up target "0") is a 400, is not stored, and nothing
    connects to that address over several handoff intervals.
    """
    c = Cluster(procs, token_file)
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen(8)
        trap.setblocking(False)
        target = f"127.0.0.1:{trap.getsockname()[1]}"
        node = c.nodes[0]
        headers = {"X-Shardkv-Version": "5-5-x", "Content-Type": "text/plain", **AUTH}
        for hint_for in [target, "0"]:
            url = f"{node.url}/replica/kv/s?hint_for={quote(hint_for, safe='')}"
            reply = c.send("PUT", url, b"payload", headers=headers)
            assert (reply.status, reply.json()["error"]) == (400, "invalid_hint_target"), reply
        assert c.send("GET", node.url + "/health").json()["hints"] == {}
        # Three handoff intervals (1 s each) for a connection that must never come.
        readable, _, _ = select.select([trap], [], [], 3.5)
        assert readable == [], f"{node.name} connected to the hint target {target}"
    member = c.nodes[1]
    url = f"{node.url}/replica/kv/s?hint_for={quote(addr(member), safe='')}"
    assert c.send("PUT", url, b"payload", headers=headers).json() == {"applied": True}
    c.assert_token_nowhere()


def test_a_node_that_was_never_told_the_members_keeps_no_hints(
    procs: ProcessSet, token_file: str
) -> None:
    node = procs.start_node(None, None, "--storage", "memory", "--token-file", token_file)
    assert send("GET", node.url + "/health").json()["members"] is None
    url = f"{node.url}/replica/kv/s?hint_for=127.0.0.1%3A9"
    reply = send("PUT", url, b"x", headers={"X-Shardkv-Version": "5-5-x", **AUTH})
    assert (reply.status, reply.json()["error"]) == (400, "invalid_hint_target"), reply


def _refused(procs: ProcessSet, name: str, *args: str) -> str:
    """Start a server that must refuse to start; its last line of output."""
    proc = procs.start(name, "node", *args, wait=False)
    assert proc.wait(DEADLINE) != 0
    lines = proc.out_path.read_text().strip().splitlines()
    return lines[-1]


def test_protected_mode_refuses_public_listeners(procs: ProcessSet, token_file: str) -> None:
    """
    Without a token, a node asked to listen on every interface exits with
    one line that says why and how to fix it; with the token it starts.
    """
    port = free_port()
    public = [
        ["--listen", "tcp:0", "--node-id", "127.0.0.1:1"],
        ["--listen", f"tcp:{port}:interface=0.0.0.0"],
    ]
    for args in public:
        line = _refused(procs, "public", "--storage", "memory", *args)
        assert "--token-file" in line and "protected mode" in line, line
    line = _refused(procs, "empty", "--token-file", str(Path(token_file).parent / "missing"))
    assert "missing" in line and "--token-file" in line, line
    node = procs.start(
        "public-with-token",
        "node",
        "--storage",
        "memory",
        "--listen",
        f"tcp:{port}:interface=0.0.0.0",
        "--token-file",
        token_file,
        port=port,
    )
    assert send("GET", node.url + "/health").status == 200
    assert send("GET", node.url + "/kv/k").status == 401
    assert send("GET", node.url + "/kv/k", headers=AUTH).status == 404


def test_hinted_handoff_with_a_token(procs: ProcessSet, token_file: str) -> None:
    """
    With the token everywhere, the proxy and hinted handoff work end to end:
    writes made while a node is down reach it once it is back, and the
    restarted node learns the members from the proxy by itself.
    """
    c = Cluster(procs, token_file)
    down = c.nodes[2]
    down.kill()
    c.wait_status(down, "down")
    keys = [f"k{i}" for i in range(20)]
    for key in keys:
        reply = c.send("PUT", c.proxy.url + "/kv/" + key, key.encode())
        assert reply.status == 201, reply
    held = sum(sum(c.send("GET", n.url + "/health").json()["hints"].values()) for n in c.nodes[:2])
    assert held == len(keys)
    down.restart()
    c.wait_members(down)

    def delivered() -> bool:
        for node in c.nodes[:2]:
            assert c.send("GET", node.url + "/health").json()["hints"] == {}
        for key in keys:
            reply = c.send("GET", down.url + "/replica/kv/" + key, headers=AUTH)
            assert (reply.status, reply.body) == (200, key.encode()), reply
        return True

    poll_until(delivered, DEADLINE, "the hints to reach the restarted node")
    c.assert_token_nowhere()
