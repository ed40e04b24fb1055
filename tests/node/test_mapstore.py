"""
Tests of the node's map store (L{shardkv.node.mapstore}): the acceptor's
answers wait for the disk, the learned map only moves forward and stays in its
cluster, and the epoch fence.

Most run on the memory engine, synchronously; L{SlowMeta} holds each
metadata write until the test lets it through, to show what is answered
before and after durability. The LMDB tests at the end show the state
surviving a restart, and the fence holding against the real committer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from shardkv.core.clustermap import ClusterMap, bootstrap
from shardkv.core.consensus import AcceptorState, Promise
from shardkv.errors import (
    ForeignCluster,
    InvalidMap,
    InvalidRequest,
    StaleEpoch,
    StorageStartupError,
)
from shardkv.node.mapstore import (
    ACCEPTOR_META,
    MAP_META,
    MapStore,
    parse_ballot,
    parse_epoch,
)
from shardkv.storage.failpoints import Failpoints
from shardkv.storage.lmdb.engine import LMDBEngine
from shardkv.storage.memory import MemoryEngine
from tests.helpers import answered
from tests.storage.helpers import MakeLMDB, reactor, rec

NODE = "127.0.0.1:8081"
NODES = {"127.0.0.1:8081": 1.0, "127.0.0.1:8082": 1.0, "127.0.0.1:8083": 1.0}
CLUSTER = "9f2c00aa11bb22cc"


def cluster_map(epoch: int = 1, cluster_id: str = CLUSTER) -> ClusterMap:
    return dataclasses.replace(bootstrap(cluster_id, NODES, 3, 2, 2, 64), epoch=epoch)


def result(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired; raises its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def pending(d: Deferred[Any]) -> bool:
    return not answered(d)


class SlowMeta(MemoryEngine):
    """A memory engine whose metadata writes wait, in order, for L{release}."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[str, bytes, Deferred[None]]] = []

    def put_meta(self, name: str, value: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.held.append((name, value, d))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for name, value, d in held:
            self._meta[name] = value
            d.callback(None)


# -- parsing ---------------------------------------------------------------------


def test_epoch_headers() -> None:
    assert parse_epoch(None) is None
    assert parse_epoch(b"0") == 0
    assert parse_epoch(b"17") == 17
    for bad in [b"", b"-1", b"1.5", b"x", b"1" * 19, b"\xff", b"1 2", b"+3"]:
        with pytest.raises(InvalidRequest) as caught:
            parse_epoch(bad)
        assert caught.value.code == "invalid_epoch", bad


def test_ballots() -> None:
    assert parse_ballot([3, "proxy-a"]) == (3, "proxy-a")
    for bad in [None, [], [1], [True, "p"], [-1, "p"], [1, ""], [1, 2], "1,p", [2**63, "p"]]:
        with pytest.raises(InvalidMap):
            parse_ballot(bad)
    with pytest.raises(InvalidMap):
        parse_ballot([1, "p" * 256])


# -- the acceptor ----------------------------------------------------------------


def test_blank_node() -> None:
    store = MapStore(NODE, MemoryEngine())
    store.load()
    assert store.learned is None
    assert store.epoch == 0
    assert store.cluster_id is None
    assert store.as_json() == {
        "node": NODE,
        "learned": None,
        "accepted_epoch": None,
        "cluster_id": None,
    }
    store.check_epoch(None)
    store.check_epoch(b"0")


def test_prepare_and_accept_follow_the_ballots() -> None:
    engine = MemoryEngine()
    store = MapStore(NODE, engine)
    value = cluster_map(1).to_json()
    assert result(store.prepare((2, "a"))) == Promise(True, (2, "a"), None, None)
    assert result(store.prepare((1, "b"))) == Promise(False, (2, "a"), None, None)
    assert result(store.accept((1, "b"), value)) is False, "below the promise"
    assert result(store.accept((2, "a"), value)) is True
    assert result(store.prepare((3, "b"))) == Promise(True, (3, "b"), (2, "a"), value)
    assert result(store.accept((2, "a"), value)) is False, "a higher ballot was promised since"
    saved = AcceptorState.from_json(json.loads(engine.get_meta(ACCEPTOR_META) or b""))
    assert saved == AcceptorState((3, "b"), (2, "a"), value)
    assert store.as_json()["accepted_epoch"] == 1
    assert store.cluster_id == CLUSTER, "an accepted map names the cluster"
    assert store.learned is None, "accepting is not learning"


def test_answers_wait_for_the_disk() -> None:
    engine = SlowMeta()
    store = MapStore(NODE, engine)
    promised = store.prepare((1, "a"))
    accepted = store.accept((1, "a"), cluster_map(1).to_json())
    assert pending(promised) and pending(accepted)
    assert engine.get_meta(ACCEPTOR_META) is None
    engine.release()
    assert result(promised).promised is True
    assert result(accepted) is True
    saved = json.loads(engine.get_meta(ACCEPTOR_META) or b"")
    assert saved["accepted_ballot"] == [1, "a"], "the last write holds the newest state"


def test_accept_refuses_a_foreign_cluster() -> None:
    store = MapStore(NODE, MemoryEngine())
    result(store.accept((1, "a"), cluster_map(1).to_json()))
    with pytest.raises(ForeignCluster) as caught:
        result(store.accept((2, "b"), cluster_map(1, "0000111122223333").to_json()))
    assert caught.value.code == "foreign_cluster"
    assert store.state.accepted_ballot == (1, "a"), "nothing changed"
    with pytest.raises(ForeignCluster):
        result(store.learn(cluster_map(1, "0000111122223333")))


# -- learning ----------------------------------------------------------------------


def test_learn_installs_newer_maps_only() -> None:
    engine = MemoryEngine()
    store = MapStore(NODE, engine)
    seen: list[int] = []
    store.subscribe(lambda m: seen.append(m.epoch))
    assert result(store.learn(cluster_map(2))) == 2
    assert store.learned == cluster_map(2)
    assert store.epoch == 2
    assert result(store.learn(cluster_map(1))) == 2, "an older map changes nothing"
    assert result(store.learn(cluster_map(2))) == 2
    assert result(store.learn(cluster_map(5))) == 5
    assert seen == [2, 5]
    assert ClusterMap.from_json(json.loads(engine.get_meta(MAP_META) or b"")) == cluster_map(5)
    assert store.as_json()["learned"] == cluster_map(5).to_json()
    with pytest.raises(ForeignCluster):
        result(store.learn(cluster_map(6, "0000111122223333")))
    assert store.epoch == 5


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    store = MapStore(NODE, MemoryEngine())
    seen: list[int] = []

    def broken(m: ClusterMap) -> None:
        raise RuntimeError("boom")

    store.subscribe(broken)
    store.subscribe(lambda m: seen.append(m.epoch))
    assert result(store.learn(cluster_map(1))) == 1
    assert seen == [1]


def test_the_fence_moves_at_once_and_the_epoch_once_durable() -> None:
    """From the moment a learn is queued, older calls are refused; the node
    reports (and tells subscribers of) the new epoch only once it is durable."""
    engine = SlowMeta()
    store = MapStore(NODE, engine)
    seen: list[int] = []
    store.subscribe(lambda m: seen.append(m.epoch))
    learned = store.learn(cluster_map(3))
    again = store.learn(cluster_map(3))
    assert pending(learned) and pending(again)
    with pytest.raises(StaleEpoch) as caught:
        store.check_epoch(b"2")
    assert caught.value.details == {"epoch": 3, "map": cluster_map(3).to_json()}
    store.check_epoch(b"3")
    store.check_epoch(b"4")
    assert store.learned is None and store.epoch == 0 and seen == []
    engine.release()
    assert result(learned) == 3 and result(again) == 3
    assert store.epoch == 3 and seen == [3]


def test_check_epoch() -> None:
    store = MapStore(NODE, MemoryEngine())
    result(store.learn(cluster_map(4)))
    store.check_epoch(None)
    store.check_epoch(b"4")
    store.check_epoch(b"9")
    with pytest.raises(StaleEpoch) as caught:
        store.check_epoch(b"0")
    err = caught.value
    assert err.code == "stale_epoch"
    assert err.details["epoch"] == 4
    assert ClusterMap.from_json(err.details["map"]) == cluster_map(4)
    assert "epoch 4" in err.message
    with pytest.raises(InvalidRequest):
        store.check_epoch(b"four")


# -- load ------------------------------------------------------------------------


def test_load_reads_what_was_stored_and_tells_subscribers() -> None:
    engine = MemoryEngine()
    first = MapStore(NODE, engine)
    result(first.prepare((7, "p")))
    result(first.accept((7, "p"), cluster_map(2).to_json()))
    result(first.learn(cluster_map(2)))
    again = MapStore(NODE, engine)
    seen: list[int] = []
    again.subscribe(lambda m: seen.append(m.epoch))
    again.load()
    assert again.state == first.state
    assert again.learned == cluster_map(2)
    assert seen == [2]
    with pytest.raises(StaleEpoch):
        again.check_epoch(b"1")


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        (MAP_META, b"not json"),
        (MAP_META, b'{"epoch": 1}'),
        (ACCEPTOR_META, b"[]"),
        (ACCEPTOR_META, b'{"promised": 1, "accepted_ballot": null, "accepted": null}'),
    ],
)
def test_unreadable_state_stops_the_node(name: str, raw: bytes) -> None:
    engine = MemoryEngine()
    result(engine.put_meta(name, raw))
    with pytest.raises(StorageStartupError, match="unreadable"):
        MapStore(NODE, engine).load()


# -- LMDB: durable across a restart, and the fence against the real committer ------


@pytest_twisted.async_yield_fixture
async def make_lmdb() -> AsyncIterator[MakeLMDB]:
    """LMDB engines, each stopped at the end (as tests/storage/conftest.py's)."""
    made: list[LMDBEngine] = []

    def make(path: Path, **kwargs: Any) -> LMDBEngine:
        kwargs.setdefault("failpoints", Failpoints())
        engine = LMDBEngine(str(path), reactor, **kwargs)
        made.append(engine)
        engine.start()
        return engine

    yield make
    for engine in made:
        await engine.stop()


@pytest_twisted.ensureDeferred
async def test_state_survives_a_restart(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    store = MapStore(NODE, engine)
    store.load()
    assert (await store.prepare((4, "p"))).promised
    assert await store.accept((4, "p"), cluster_map(3).to_json()) is True
    assert await store.prepare((5, "q")) == Promise(
        True, (5, "q"), (4, "p"), cluster_map(3).to_json()
    )
    assert await store.learn(cluster_map(3)) == 3
    await engine.stop()
    reopened = make_lmdb(tmp_path)
    again = MapStore(NODE, reopened)
    again.load()
    assert again.state == AcceptorState((5, "q"), (4, "p"), cluster_map(3).to_json())
    assert again.learned == cluster_map(3)
    assert again.epoch == 3
    assert (await again.prepare((4, "z"))).promised is False, "the promise outlived the restart"
    assert list(reopened.scan()) == [], "none of it is a record"


@pytest_twisted.ensureDeferred
async def test_writes_accepted_before_a_learn_are_committed_when_it_returns(
    tmp_path: Path, make_lmdb: MakeLMDB
) -> None:
    """The fence: writes that passed the epoch check before the learn was queued
    are committed (and seen by a scan) once the learn fires; later ones at the
    old epoch are refused."""
    engine = make_lmdb(tmp_path, failpoints=Failpoints("storage.commit.sleep_ms=*50"))
    store = MapStore(NODE, engine)
    store.load()
    await store.learn(cluster_map(1))
    writes = []
    for i in range(100):
        store.check_epoch(b"1")
        writes.append(engine.put(f"k{i:03d}", rec(1)))
    learned = store.learn(cluster_map(2))
    assert not all(d.called for d in writes), "the writes were still queued at the learn"
    with pytest.raises(StaleEpoch):
        store.check_epoch(b"1")
    fired_at_learn: list[int] = []
    scanned_at_learn: list[int] = []

    def at_learn(epoch: int) -> int:
        fired_at_learn.append(sum(1 for d in writes if d.called))
        scanned_at_learn.append(len(list(engine.scan(limit=1000))))
        return epoch

    assert await learned.addCallback(at_learn) == 2
    assert fired_at_learn == [100]
    assert scanned_at_learn == [100]
    assert await gatherResults(writes) == [True] * 100
    engine.failpoints.clear()


# -- a plan's map, said to the proxies -------------------------------------------------


def test_a_planned_map_is_said_until_its_epoch_is_installed() -> None:
    """
    L{MapStore.note_planned}: the map a plan asked this node about shows in
    ``GET /replica/map`` as ``planned`` (so that every proxy can build its
    rings ahead), only for this node's cluster and only while it is newer
    than the newest install.
    """
    store = MapStore(NODE, MemoryEngine())
    store.load()
    result(store.learn(cluster_map(1)))
    store.note_planned(cluster_map(2, cluster_id="0" * 16))
    store.note_planned(cluster_map(1))
    assert "planned" not in store.as_json(), "another cluster's, or not newer"
    store.note_planned(cluster_map(2))
    assert store.as_json()["planned"] == cluster_map(2).to_json()
    result(store.learn(cluster_map(2)))
    assert "planned" not in store.as_json()
