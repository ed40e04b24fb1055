"""
Unit tests of a node's store, L{NodeStore}, directly over a memory engine.

The store is what the node's routes ask of its storage: the data API's
reads and writes (checked and versioned here, against the engine's newest
record), and the replica routes' records minted elsewhere or kept as hints.
No HTTP: the routes' tests are C{tests.node.test_app}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.clustermap import bootstrap
from shardkv.core.conditions import Precondition
from shardkv.core.records import CorruptRecord, Record
from shardkv.core.versions import Version, VersionClock
from shardkv.errors import NotFound, PreconditionFailed, StorageFull, ValueTooLarge
from shardkv.node.mapstore import MapStore
from shardkv.node.members import Members
from shardkv.node.store import NodeStore, PutOutcome
from shardkv.replica import codec
from shardkv.storage.memory import MemoryEngine

NODE_ID = "127.0.0.1:8081"
NOW_MS = 5_000
LIMIT = 16


class QueuedEngine(MemoryEngine):
    """
    A memory engine whose writes wait in a queue until C{commit}, as a real
    engine's group commit does: C{latest} sees them, C{get} does not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[tuple[str, Record, Deferred[bool]]] = []

    def latest(self, key: str) -> Record | None:
        for queued_key, record, _ in reversed(self.queued):
            if queued_key == key:
                return record
        return self.get(key)

    def put(self, key: str, record: Record) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.queued.append((key, record, d))
        return d

    def commit(self) -> None:
        queued, self.queued = self.queued, []
        for key, record, d in queued:
            MemoryEngine.put(self, key, record).chainDeferred(d)


class FaultyEngine(MemoryEngine):
    """A memory engine with a full disk for keys starting "full", and corrupt ones for "bad"."""

    def get(self, key: str) -> Record | None:
        if key.startswith("bad"):
            raise CorruptRecord("record checksum mismatch")
        return super().get(key)

    latest = get

    def put(self, key: str, record: Record) -> Deferred[bool]:
        if key.startswith("full"):
            return fail(StorageFull("the disk is full"))
        return super().put(key, record)


def store_over(engine: MemoryEngine) -> NodeStore:
    versions = VersionClock(NODE_ID, lambda: NOW_MS)
    members = Members([NODE_ID, "127.0.0.1:8082", "127.0.0.1:8083"])
    return NodeStore(NODE_ID, engine, versions, LIMIT, lambda: NOW_MS, members)


def minted(counter: int, writer: str = "proxy-test") -> Record:
    """A record minted elsewhere, as the replica routes receive one."""
    return Record(Version(counter, counter, writer), b"v%d" % counter, "text/plain")


class DataAPITests(SynchronousTestCase):
    """The data API's writes: checked and versioned against the newest record, queued or not."""

    def setUp(self) -> None:
        self.engine = QueuedEngine()
        self.store = store_over(self.engine)

    def test_write_mints_over_the_latest_queued_record(self) -> None:
        """
        Two writes queued in the same group get increasing versions, and the
        second one's precondition sees the first: checking against the
        committed record alone would let both pass an If-None-Match: *.
        """
        first = self.store.write("k", b"1", "text/plain", Precondition())
        second = self.store.write("k", b"2", "text/plain", Precondition())
        self.assertNoResult(first)
        with self.assertRaises(PreconditionFailed):
            self.store.write("k", b"3", "text/plain", Precondition(none_match_any=True))
        self.engine.commit()
        one, two = self.successResultOf(first), self.successResultOf(second)
        self.assertEqual((one.version.counter, one.created), (1, True))
        self.assertEqual((two.version.counter, two.created), (2, False))
        self.assertEqual((one.version.writer, one.version.clock_ms), (NODE_ID, NOW_MS))
        self.assertGreater(two.version, one.version)
        record = self.engine.get("k")
        assert record is not None
        self.assertEqual(
            (record.version, record.value, record.stored_ms), (two.version, b"2", NOW_MS)
        )

    def test_if_match_failure_raises_precondition_failed(self) -> None:
        self.store.write("k", b"1", "text/plain", Precondition())
        self.engine.commit()
        stale = Version(9, 9, "other")
        with self.assertRaises(PreconditionFailed) as raised:
            self.store.write("k", b"2", "text/plain", Precondition(if_match=frozenset([stale])))
        self.assertIn("If-Match wants 9-9-other", raised.exception.message)
        with self.assertRaises(PreconditionFailed):
            self.store.remove("k", Precondition(if_match=frozenset([stale])))
        self.assertEqual(self.engine.queued, [])

    def test_remove_of_an_absent_key_raises_not_found(self) -> None:
        """Absent, or already deleted (even while the delete is only queued): nothing to remove."""
        with self.assertRaises(NotFound) as raised:
            self.store.remove("ghost", Precondition())
        self.assertEqual(
            (raised.exception.code, raised.exception.message),
            ("not_found", "no value for key 'ghost'"),
        )
        self.store.write("k", b"1", "text/plain", Precondition())
        deleted = self.store.remove("k", Precondition())
        with self.assertRaises(NotFound):
            self.store.remove("k", Precondition())
        self.engine.commit()
        self.assertEqual(self.successResultOf(deleted).counter, 2)
        self.assertIsNone(self.store.read("k"))


class ReplicaRouteTests(SynchronousTestCase):
    """What the replica routes ask: records as replication sees them, accepts, and batches."""

    def setUp(self) -> None:
        self.engine = FaultyEngine()
        self.store = store_over(self.engine)

    def test_replica_record_includes_tombstones(self) -> None:
        tombstone = Record.deleted(Version(3, 3, "proxy-test"))
        self.successResultOf(self.engine.put("gone", tombstone))
        self.assertEqual(self.store.replica_record("gone"), tombstone)
        self.assertIsNone(self.store.read("gone"))
        with self.assertRaises(NotFound) as raised:
            self.store.replica_record("never")
        self.assertEqual(raised.exception.code, "not_found")

    def test_replica_record_reports_a_corrupt_record_as_not_found(self) -> None:
        """
        A corrupt record is "no record" to replication, so the coordinator's
        read repair overwrites it with a good copy; the code tells the two
        apart. The data API's read fails instead, naming the node.
        """
        with self.assertRaises(NotFound) as raised:
            self.store.replica_record("bad-1")
        self.assertEqual(raised.exception.code, "corrupt_record")
        self.assertIn("record checksum mismatch", raised.exception.message)
        with self.assertRaises(CorruptRecord) as corrupt:
            self.store.read("bad-1")
        self.assertIn(NODE_ID, str(corrupt.exception))

    def test_accept_with_hint_for_stores_a_hint_and_not_a_record(self) -> None:
        """A stand-in must not serve a key it keeps only for another node."""
        home = "127.0.0.1:8083"
        self.assertTrue(self.successResultOf(self.store.accept("k", minted(1), home)))
        self.assertIsNone(self.engine.get("k"))
        [(key, hint)] = self.engine.hints(home)
        self.assertEqual((key, hint.version, hint.stored_ms), ("k", minted(1).version, NOW_MS))
        self.assertEqual(self.engine.hint_counts(), {home: 1})

    def test_accept_stores_only_newer_records(self) -> None:
        self.assertTrue(self.successResultOf(self.store.accept("k", minted(2), None)))
        self.assertFalse(self.successResultOf(self.store.accept("k", minted(1), None)))
        record = self.engine.get("k")
        assert record is not None
        self.assertEqual((record.version, record.stored_ms), (minted(2).version, NOW_MS))
        self.assertEqual(self.engine.hint_counts(), {})

    def test_replica_put_says_what_the_node_held(self) -> None:
        """
        A replica write answers what the node held before it, queued writes
        included: nothing; an older live record (applied); a newer tombstone
        (refused). A hint answers a bare "applied", and a corrupt record counts
        as nothing held.
        """
        put = self.store.replica_put
        self.assertEqual(
            self.successResultOf(put("k", minted(2), None)), PutOutcome(True, None, False)
        )
        self.assertEqual(
            self.successResultOf(put("k", Record.deleted(minted(4).version), None)),
            PutOutcome(True, minted(2).version, True),
        )
        self.assertEqual(
            self.successResultOf(put("k", minted(3), None)),
            PutOutcome(False, minted(4).version, False),
        )
        self.assertIs(self.successResultOf(put("k", minted(5), "127.0.0.1:8083")), True)
        self.assertEqual(self.successResultOf(put("bad-1", minted(9), None)).held, None)
        self.assertEqual(
            self.successResultOf(self.store.replica_put_answer("k", minted(3), None)),
            {"applied": False, "live": False, "held": str(minted(4).version)},
        )

    def test_run_batch_returns_each_operations_outcome(self) -> None:
        """
        One operation's failure is its own outcome: the rest of the batch
        still runs, and a storage error names the node it happened on.
        """
        self.successResultOf(self.engine.put("old", minted(5)))
        ops: list[codec.Op] = [
            codec.GetOp("old"),
            codec.GetOp("absent"),
            codec.GetOp("bad-1"),
            codec.PutOp("new", minted(1)),
            codec.PutOp("old", minted(4)),
            codec.PutOp("big", Record(Version(1, 1, "w"), b"x" * (LIMIT + 1))),
            codec.PutOp("full-1", minted(1)),
            codec.PutOp("hinted", minted(1), "127.0.0.1:8083"),
        ]
        outcomes = self.successResultOf(self.store.run_batch(ops))
        self.assertEqual(len(outcomes), len(ops))
        got, absent, corrupt, new, old, big, full, hinted = outcomes
        self.assertEqual(got, self.engine.get("old"))
        assert isinstance(absent, NotFound) and isinstance(corrupt, NotFound)
        self.assertEqual((absent.code, corrupt.code), ("not_found", "corrupt_record"))
        self.assertEqual(
            (new, old, hinted),
            (PutOutcome(True, None, False), PutOutcome(False, minted(5).version, True), True),
        )
        assert isinstance(big, ValueTooLarge)
        self.assertEqual(
            (big.code, big.message),
            ("value_too_large", f"the value is over this node's {LIMIT}-byte limit"),
        )
        self.assertIsNone(self.engine.get("big"))
        assert isinstance(full, StorageFull)
        self.assertEqual(
            (full.code, full.message), ("insufficient_storage", f"{NODE_ID}: the disk is full")
        )
        self.assertEqual(self.engine.hint_counts(), {"127.0.0.1:8083": 1})


class MapStoreWiringTests(SynchronousTestCase):
    """The store holds the node's map store, and its members follow the learned map."""

    def test_a_blank_map_store_by_default_and_members_follow_it(self) -> None:
        members = Members(["127.0.0.1:8089"])
        store = NodeStore(
            NODE_ID,
            MemoryEngine(),
            VersionClock(NODE_ID, lambda: NOW_MS),
            LIMIT,
            lambda: NOW_MS,
            members=members,
        )
        self.assertIsNone(store.mapstore.learned)
        m = bootstrap("9f2c00aa11bb22cc", {NODE_ID: 1.0, "127.0.0.1:8082": 1.0}, 2, 1, 1, 16)
        self.assertEqual(self.successResultOf(store.mapstore.learn(m)), 1)
        self.assertEqual(members.as_json(), [NODE_ID, "127.0.0.1:8082"])
        record = Record(Version(1, 1, "p"), b"v", "text/plain")
        self.assertTrue(self.successResultOf(store.accept("k", record, "127.0.0.1:8082")))
        self.failureResultOf(store.accept("k", record, "127.0.0.1:8089"))

    def test_a_given_map_store_is_used(self) -> None:
        engine = MemoryEngine()
        mapstore = MapStore(NODE_ID, engine)
        store = NodeStore(
            NODE_ID,
            engine,
            VersionClock(NODE_ID, lambda: NOW_MS),
            LIMIT,
            lambda: NOW_MS,
            mapstore=mapstore,
        )
        self.assertIs(store.mapstore, mapstore)
