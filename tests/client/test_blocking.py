"""The blocking client over real sockets: a real memory node, and sockets that misbehave."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardkv.client.blocking import BlockingClient, MaybeSent, NotSent, ReactorThread, request
from shardkv.testing.polling import HOST, free_port, poll_until
from shardkv.testing.processes import Proc, ProcessSet
from tests.system.procs import process_set

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    procs = ProcessSet(tmp_path_factory.mktemp("node"))
    try:
        yield procs.start_node(None, None, "--storage", "memory")
    finally:
        procs.close()


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket that nobody answers on (the kernel still completes connects)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        s.listen(16)
        yield s


def url_of(s: socket.socket) -> str:
    return f"http://{HOST}:{s.getsockname()[1]}"


def test_api_round_trip(node: Proc) -> None:
    with BlockingClient(node.url) as kv:
        assert kv.health().json()["status"] == "ok"
        assert kv.set("seed/key", "alice").status == 200
        assert kv.get("seed/key").json()["value"] == "alice"
        created = kv.put("rest key", b"\xff\x00", content_type="application/octet-stream")
        assert created.status == 201, created
        got = kv.read("rest key")
        assert (got.status, got.body) == (200, b"\xff\x00")
        assert got.header("etag") == created.header("etag")
        assert kv.delete("rest key", if_match="1-0-nobody").status == 412
        assert kv.delete("rest key").status == 200
        assert kv.read("rest key").status == 404


def test_one_off_request_to_a_full_url(node: Proc) -> None:
    reply = request("POST", node.url + "/set", json={"key": "one-off", "value": "v"})
    assert reply.status == 200, reply
    assert request("GET", node.url + "/get?key=one-off").json()["value"] == "v"


def test_connection_refused_is_not_sent() -> None:
    port = free_port()  # nothing listens there
    with BlockingClient(f"http://{HOST}:{port}") as kv, pytest.raises(NotSent, match="refused"):
        kv.set("k", "v")


def test_no_answer_is_maybe_sent(listener: socket.socket) -> None:
    with BlockingClient(url_of(listener), timeout=0.3) as kv, pytest.raises(MaybeSent):
        kv.set("k", "v")


def test_connection_dropped_after_the_request_is_maybe_sent(listener: socket.socket) -> None:
    received: list[bytes] = []

    def drop_one() -> None:
        conn, _ = listener.accept()
        with conn:
            received.append(conn.recv(65536))

    dropper = threading.Thread(target=drop_one, daemon=True)
    dropper.start()
    with BlockingClient(url_of(listener), timeout=5.0) as kv, pytest.raises(MaybeSent):
        kv.put("k", "v")
    dropper.join(5.0)
    assert received and received[0].startswith(b"PUT /kv/k HTTP/1.1")


def test_many_threads_share_one_client(node: Proc) -> None:
    errors: list[BaseException] = []
    with BlockingClient(node.url) as kv:

        def writer(n: int) -> None:
            try:
                for i in range(20):
                    assert kv.put(f"t{n}-{i}", f"{n}.{i}").status == 201
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30.0)
        assert not errors, errors[0]
        assert not any(t.is_alive() for t in threads)
        assert kv.read("t15-19").text == "15.19"


def test_close_stops_the_reactor_thread(node: Proc) -> None:
    kv = BlockingClient(node.url)
    view = kv.at(node.url, timeout=1.0)
    assert view.health().status == 200
    view.close()  # a view owns nothing
    assert kv.thread.alive
    kv.close()
    poll_until(lambda: not kv.thread._thread.is_alive(), 5.0, "the reactor thread to end")
    with pytest.raises(RuntimeError, match="stopped"):
        kv.health()
    kv.close()  # idempotent


def test_reactor_thread_refuses_to_wait_on_itself() -> None:
    loop = ReactorThread()
    try:
        with pytest.raises(RuntimeError, match="deadlock"):
            loop.call(loop.call, lambda: None)  # type: ignore[arg-type]
    finally:
        loop.stop()


def test_restarted_node_is_reached_again(procs: ProcessSet, tmp_path: Path) -> None:
    node = procs.start_node(None, tmp_path / "data")
    # A connection per request: a pooled one might not have seen the kill yet.
    with BlockingClient(node.url, timeout=2.0, persistent=False) as kv:
        assert kv.put("k", "before").status == 201
        node.kill()
        with pytest.raises(NotSent):
            kv.read("k")
        node.restart()
        assert kv.read("k").text == "before"
