"""End to end: real ``twistd`` processes, started as a user would start them.

Three nodes and the proxy each run in their own process on free ports of
127.0.0.1; the tests walk the README flow through the proxy, kill a node
with SIGKILL and check what clients see, and check the one-process
``cluster`` command and two plain ``twistd -n shardkv node`` runs sharing a
working directory. Every wait polls with a deadline.
"""

from __future__ import annotations

import signal
import time
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

KEYS = 60
DOWN_DEADLINE = 5.0
"""Seconds the proxy may take to show a killed node as down (health checks run every 1 s)."""


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


def addr(proc: Proc) -> str:
    return f"127.0.0.1:{proc.port}"


def cluster_view(proxy_url: str) -> dict[str, str]:
    """Node address -> health status, as the proxy's /cluster shows it."""
    reply = send("GET", proxy_url + "/cluster")
    assert reply.status == 200, reply
    return {n["node"]: n["health"]["status"] for n in reply.json()["nodes"]}


def wait_statuses(proxy_url: str, want: dict[str, str], deadline: float) -> None:
    def check() -> bool:
        view = cluster_view(proxy_url)
        assert {n: view.get(n) for n in want} == want, view
        return True

    poll_until(check, deadline, f"/cluster to show {want}")


def is_json(reply: Reply) -> Any:
    assert reply.headers.get("content-type", "").startswith("application/json"), reply
    return reply.json()


def readme_flow(url: str) -> None:
    """The README's curl session, against a proxy or a node."""
    reply = send("POST", url + "/set", json={"key": "name", "value": "alice"})
    assert reply.status == 200, reply
    assert is_json(reply)["key"] == "name"
    reply = send("GET", url + "/get?key=name")
    assert reply.status == 200, reply
    assert is_json(reply)["value"] == "alice"
    etag = reply.headers["etag"]

    reply = send(
        "PUT", url + "/kv/greeting", b"hello, world", headers={"Content-Type": "text/plain"}
    )
    assert reply.status == 201, reply
    reply = send("GET", url + "/kv/greeting")
    assert (reply.status, reply.body) == (200, b"hello, world"), reply
    assert reply.headers["content-type"] == "text/plain"
    reply = send("PUT", url + "/kv/greeting", b"hi again")
    assert reply.status == 200, reply
    reply = send("DELETE", url + "/kv/greeting")
    assert reply.status == 200, reply
    assert is_json(reply)["deleted"] is True
    reply = send("GET", url + "/kv/greeting")
    assert reply.status == 404, reply
    assert is_json(reply)["error"] == "not_found"

    first = send("GET", url + "/get?key=name").json()["version"]
    reply = send("POST", url + "/set", json={"key": "name", "value": "carol", "version": first})
    assert reply.status == 200, reply  # still at that version: written
    reply = send("POST", url + "/set", json={"key": "name", "value": "bob", "version": first})
    assert reply.status == 412, reply  # no longer at that version: refused
    assert is_json(reply)["error"] == "precondition_failed"
    reply = send("GET", url + "/get?key=name")
    assert is_json(reply)["value"] == "carol"
    assert reply.headers["etag"] != etag
    reply = send("POST", url + "/delete", json={"key": "name"})
    assert reply.status == 200, reply
    reply = send("GET", url + "/get?key=name")
    assert reply.status == 404, reply


def kv(key: str) -> str:
    return "/kv/" + quote(key, safe="")


def test_three_nodes_proxy_and_a_killed_node(procs: ProcessSet, tmp_path: Path) -> None:
    """
    If three lmdb nodes and a proxy run as separate processes, then the
    README flow works through the proxy and every key lands on the node
    /explain names. If the owner of a key is then killed with SIGKILL,
    /cluster shows it down within a few seconds, a read of its keys answers
    502 or 503 naming it, keys on the other nodes still read back, and once
    restarted it serves its keys again from disk.
    """
    nodes = [
        procs.start_node(None, tmp_path / f"data-{i}", name=f"node{i}", wait=False)
        for i in (1, 2, 3)
    ]
    # One copy per key (the seed's model): a dead owner makes its keys unavailable.
    proxy = procs.start_proxy(None, nodes, "--replicas", "1", "--r", "1", "--w", "1", wait=False)
    for node in nodes:
        health = is_json(node.wait_healthy())
        assert (health["role"], health["storage"]["engine"]) == ("node", "lmdb"), health
    proxy.wait_healthy()
    wait_statuses(proxy.url, {addr(n): "up" for n in nodes}, DOWN_DEADLINE)

    readme_flow(proxy.url)

    values = {f"user/{i:03d}": f"value {i} \u2713" for i in range(KEYS)}
    for key, value in values.items():
        reply = send("PUT", proxy.url + kv(key), value)
        assert reply.status == 201, reply

    owners: dict[str, str] = {}
    for key in values:
        reply = send("GET", f"{proxy.url}/explain?key={quote(key, safe='')}")
        assert reply.status == 200, reply
        owners[key] = is_json(reply)["owner"]
    by_node = {addr(n): n for n in nodes}
    assert set(owners.values()) == set(by_node), f"{KEYS} keys did not spread: {owners}"
    for key, owner in owners.items():  # each key is on its owner: read the node directly
        reply = send("GET", by_node[owner].url + kv(key))
        assert (reply.status, reply.text) == (200, values[key]), (key, owner, reply)

    victim = by_node[owners["user/000"]]
    victim.kill()
    assert victim.returncode == -signal.SIGKILL
    alive = {addr(n): "up" for n in nodes if n is not victim}
    wait_statuses(proxy.url, {**alive, addr(victim): "down"}, DOWN_DEADLINE)
    health = is_json(send("GET", proxy.url + "/health"))
    assert (health["nodes_up"], health["nodes_total"]) == (2, 3), health

    for key, owner in owners.items():
        reply = send("GET", proxy.url + kv(key))
        if owner == addr(victim):
            assert reply.status in (502, 503), reply
            body = is_json(reply)
            assert body["failed"] == [addr(victim)], body
            assert addr(victim) in body["message"], body
        else:
            assert (reply.status, reply.text) == (200, values[key]), (key, reply)

    victim.restart()
    wait_statuses(proxy.url, {addr(n): "up" for n in nodes}, DOWN_DEADLINE)
    for key, owner in owners.items():
        if owner == addr(victim):
            reply = send("GET", proxy.url + kv(key))
            assert (reply.status, reply.text) == (200, values[key]), (key, reply)


def test_cluster_command_serves_the_flow(procs: ProcessSet, tmp_path: Path) -> None:
    """
    If C{twistd -n shardkv cluster} runs with its data under tmp_path, then
    one process serves three nodes and the proxy, and the README flow works.
    """
    node_ports = [free_port() for _ in range(3)]
    cluster = procs.start_cluster(None, node_ports, "--data-dir", str(tmp_path / "cluster-data"))
    assert len(procs.procs) == 1
    for port in node_ports:
        reply = send("GET", f"http://127.0.0.1:{port}/health")
        assert reply.status == 200, reply
        assert is_json(reply)["role"] == "node"
    wait_statuses(cluster.url, {f"127.0.0.1:{p}": "up" for p in node_ports}, DOWN_DEADLINE)
    readme_flow(cluster.url)
    for port in node_ports:
        assert (tmp_path / "cluster-data" / f"node-{port}").is_dir()


def test_two_nodes_from_one_directory(procs: ProcessSet, tmp_path: Path) -> None:
    """
    If two nodes are started from the same directory with plain
    C{twistd -n shardkv node --port N} (no --pidfile), then both run: neither
    refuses because of the other's pidfile, and no twistd.pid is left behind.
    """
    started = []
    for name in ("first", "second"):
        port = free_port()
        started.append(
            procs.start(name, "node", "--port", str(port), port=port, cwd=tmp_path, pidfile=None)
        )
    assert "--pidfile" not in " ".join(started[1].args)
    for proc in started:
        proc.check_running()
        assert is_json(send("GET", proc.url + "/health"))["status"] == "ok"
        reply = send("PUT", proc.url + "/kv/who", proc.name)
        assert reply.status == 201, reply
    for proc in started:
        assert send("GET", proc.url + "/kv/who").text == proc.name
    assert not (tmp_path / "twistd.pid").exists()
    assert sorted(p.name for p in (tmp_path / "shardkv-data").iterdir()) == sorted(
        f"node-{p.port}" for p in started
    )


def test_process_helpers_report_a_failed_start(procs: ProcessSet) -> None:
    """
    If a server cannot start (here: a bad option), then waiting for it fails
    at once with its exit status and log tail, instead of at the deadline.
    """
    port = free_port()
    proc = procs.start(
        "broken", "node", "--port", str(port), "--storage", "floppy", port=port, wait=False
    )
    started = time.monotonic()
    with pytest.raises(AssertionError) as caught:
        proc.wait_healthy(deadline=60.0)
    assert time.monotonic() - started < 30.0
    assert "exited with status" in str(caught.value)
    assert "--storage must be lmdb or memory" in str(caught.value)
