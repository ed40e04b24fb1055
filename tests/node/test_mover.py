"""
Tests of L{Mover}: a node's stream of copies to the new owners of its records,
its cleanup of the records it no longer owns, and its share of a plan.

The node runs on a memory engine with a real L{MapStore} and a fake clock;
its peers are L{FakePeers}, which store what they receive in memory engines
of their own and can be made to fail, or to hold their answers. What must
hold: every copy the planner asks for reaches its destination even when the
destination fails for a while (the same batch is retried, none skipped); a
restarted node resumes after its last acknowledged round; the rate cap paces
the stream by the clock; the cleanup deletes exactly the records the node
does not own; the plan counts exactly what the stream moves as primary; and
a newer map stops the task of an older epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from itertools import pairwise
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, FirstError, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.clustermap import ClusterMap, bootstrap
from shardkv.core.membership import abort, next_phase, stage
from shardkv.core.movement import MovePlanner, owns
from shardkv.core.placement import hash_key
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.errors import NodeUnreachable, StorageFull
from shardkv.node.mapstore import MapStore
from shardkv.node.mover import (
    PACED_RECORDS,
    Mover,
    StreamProgress,
    record_bytes,
    stream_meta,
)
from shardkv.replica import codec
from shardkv.replica.protocol import FENCE_GRACE
from shardkv.storage.memory import MemoryEngine

T = TypeVar("T")
A, B, C, D, E = (f"127.0.0.1:{port}" for port in (8081, 8082, 8083, 8084, 8085))
OLD = (A, B, C)
CLUSTER = "0123456789abcdef"
VNODES = 64


def cluster(nodes: Sequence[str] = OLD) -> ClusterMap:
    return bootstrap(CLUSTER, dict.fromkeys(nodes, 1.0), n=3, r=2, w=2, vnodes=VNODES)


def joining(rate: int = 0) -> ClusterMap:
    """Epoch 2: D joins A, B and C (copying)."""
    return stage(cluster(), add=[(D, 1.0)], rate=rate)


def record(i: int, value: bytes = b"v" * 100) -> Record:
    return Record(Version(i + 1, 1000 + i, "w"), value, "text/plain")


def fill(engine: MemoryEngine, count: int) -> None:
    for i in range(count):
        engine.put(f"k{i:05d}", record(i))
    engine.put("tomb", Record.deleted(Version(1, 1, "w")))


def expected_copies(engine: MemoryEngine, m: ClusterMap, node: str) -> dict[str, set[str]]:
    """Destination -> the keys ``node`` must send it under ``m``."""
    planner = MovePlanner.for_map(m)
    out: dict[str, set[str]] = {}
    for key, _ in engine.scan("", 10**6):
        km = planner.for_hash(hash_key(key))
        if km is not None and node in km.sources:
            for dest in km.destinations:
                out.setdefault(dest, set()).add(key)
    return out


class FakePeers:
    """Destinations as memory engines; ``down`` ones refuse, ``holding`` ones never answer."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.engines: dict[str, MemoryEngine] = {}
        self.down: set[str] = set()
        self.holding = False
        self.held: list[Deferred[list[codec.Result]]] = []
        self.cancelled = 0
        self.calls: list[tuple[float, str, list[str], int | None]] = []
        self.answer: Callable[[codec.PutOp], codec.Result] | None = None

    def engine(self, node: str) -> MemoryEngine:
        return self.engines.setdefault(node, MemoryEngine())

    def send_stream(
        self, node: str, ops: Sequence[codec.PutOp], epoch: int | None
    ) -> Deferred[list[codec.Result]]:
        self.calls.append((self.clock.seconds(), node, [op.key for op in ops], epoch))
        if node in self.down:
            return fail(NodeUnreachable(node, "connection refused", sent=False))
        if self.holding:

            def cancelled(d: Deferred[Any]) -> None:
                self.cancelled += 1

            d: Deferred[list[codec.Result]] = Deferred(cancelled)
            self.held.append(d)
            return d
        results = []
        for op in ops:
            result = None if self.answer is None else self.answer(op)
            if result is not None and result.status != 200:
                results.append(result)
                continue
            self.engine(node).put(op.key, op.record)
            results.append(codec.Result(200, applied=True))
        return succeed(results)

    def replica_put(
        self,
        node: str,
        key: str,
        record: Record,
        hint_for: str | None = None,
        epoch: int | None = None,
    ) -> Deferred[bool]:
        if node in self.down:
            return fail(NodeUnreachable(node, "connection refused", sent=False))
        return self.engine(node).put(key, record)

    def sent(self, node: str) -> list[str]:
        """Every key sent to ``node``, in order, retries included."""
        return [key for _, n, keys, _ in self.calls if n == node for key in keys]


class MetaEngine(MemoryEngine):
    """A memory engine whose metadata writes fail once ``meta_writes_left`` run out."""

    meta_writes_left: int | None = None

    def put_meta(self, name: str, value: bytes) -> Deferred[None]:
        if self.meta_writes_left is not None:
            if self.meta_writes_left <= 0:
                return fail(StorageFull("disk full"))
            self.meta_writes_left -= 1
        return super().put_meta(name, value)


class MoverCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(100.0)
        self.engine = MetaEngine()
        self.peers = FakePeers(self.clock)
        self.mapstore, self.mover = self.boot(A)

    def boot(self, node: str, batch_records: int = 64) -> tuple[MapStore, Mover]:
        """A node's map store and mover over ``self.engine``, as a (re)started node has them."""
        mapstore = MapStore(node, self.engine)
        mapstore.load()
        mover = Mover(node, self.engine, mapstore, self.peers, self.clock, batch_records)
        mover.start()
        return mapstore, mover

    def learn(self, m: ClusterMap, mapstore: MapStore | None = None) -> None:
        self.successResultOf((mapstore or self.mapstore).learn(m))

    def drive(self, until: Callable[[], bool], seconds: float = 120.0) -> None:
        """Run the clock's calls, in time order, until ``until()`` or ``seconds`` have passed."""
        deadline = self.clock.seconds() + seconds
        while not until() and self.clock.seconds() < deadline:
            calls = self.clock.getDelayedCalls()
            if not calls:
                break
            due = min(c.getTime() for c in calls)
            self.clock.advance(max(0.0, due - self.clock.seconds()))

    def result(self, work: Coroutine[Any, Any, T]) -> T:
        """What ``work`` (a mover's coroutine) returns, running the clock until it does."""
        d = Deferred.fromCoroutine(work)
        box: list[T] = []
        d.addCallback(box.append)
        self.drive(lambda: bool(box))
        return self.successResultOf(d) if not box else box[0]

    def stream(self, mover: Mover | None = None) -> dict[str, Any]:
        status: dict[str, Any] = (mover or self.mover).status()["stream"]
        return status

    def stream_done(self, mover: Mover | None = None) -> bool:
        return bool(self.stream(mover)["state"] == "done")


class StreamTests(MoverCase):
    def test_every_planned_copy_arrives_and_the_plan_counts_the_primary_ones(self) -> None:
        """
        A stream sends each record to every destination for which the node is
        a source, nothing else, tombstones included; keys_moved and
        bytes_moved count the copies where it is the primary source, which are
        what its plan reports, key by key in plan_keys.
        """
        fill(self.engine, 600)
        m = joining()
        plan = self.result(self.mover.plan(m))
        self.learn(m)
        self.drive(self.stream_done)
        status = self.stream()
        self.assertEqual(status["state"], "done")
        expected = expected_copies(self.engine, m, A)
        self.assertEqual(set(expected), {D})
        for dest, keys in expected.items():
            got = self.peers.engine(dest)
            self.assertEqual({k for k, _ in got.scan("", 10**6)}, keys)
            for key in keys:
                self.assertEqual(got.get(key), self.engine.get(key))
        self.assertEqual(len(self.peers.sent(D)), len(expected[D]))  # no retries, no repeats
        self.assertEqual({e for _, _, _, e in self.peers.calls}, {m.epoch})
        self.assertEqual(status["copies_sent"], len(expected[D]))
        self.assertEqual(status["keys_scanned"], 601)

        planner = MovePlanner.for_map(m)
        primary = [
            (k, r)
            for k, r in self.engine.scan("", 10**6)
            if (km := planner.for_hash(hash_key(k))) is not None and km.primary == A
        ]
        self.assertGreater(len(primary), 0)
        self.assertEqual(
            plan,
            {
                "node": A,
                "pairs": [
                    {
                        "from": A,
                        "to": D,
                        "keys": len(primary),
                        "bytes": sum(record_bytes(k, r) for k, r in primary),
                    }
                ],
                "keys_scanned": 601,
            },
        )
        self.assertEqual(status["keys_moved"], plan["pairs"][0]["keys"])
        self.assertEqual(status["bytes_moved"], plan["pairs"][0]["bytes"])

        pages: list[str] = []
        cursor: str | None = ""
        while cursor is not None:
            page = self.result(self.mover.plan_keys(m, D, cursor, 7))
            pages += page["keys"]
            cursor = page["cursor"]
        self.assertEqual(pages, [k for k, _ in primary])

    def test_a_failing_destination_gets_the_same_batch_again_and_nothing_is_skipped(
        self,
    ) -> None:
        """
        While the destination refuses, the stream waits, says why, and
        retries its first batch after a growing backoff (0.5 s up to 5 s);
        no cursor moves. Once it answers, the same batch goes first and
        every copy arrives.
        """
        fill(self.engine, 600)
        m = joining()
        self.peers.down.add(D)
        self.learn(m)
        self.drive(lambda: False, seconds=30.0)
        status = self.stream()
        self.assertEqual(status["state"], "waiting")
        self.assertIn("connection refused", status["last_error"])
        attempts = [(t, keys) for t, node, keys, _ in self.peers.calls if node == D]
        first = attempts[0][1]
        self.assertTrue(all(keys == first for _, keys in attempts))
        gaps = [round(b[0] - a[0], 3) for a, b in pairwise(attempts)]
        self.assertEqual(gaps[:5], [0.5, 1.0, 2.0, 4.0, 5.0])
        self.assertTrue(all(g == 5.0 for g in gaps[4:]))
        saved = self.engine.get_meta(stream_meta(m.epoch))
        self.assertTrue(saved is None or b'"cursor": ""' in saved)

        self.peers.down.clear()
        self.drive(self.stream_done)
        self.assertEqual(self.stream()["state"], "done")
        self.assertIsNone(self.stream()["last_error"])
        after = [keys for _, node, keys, _ in self.peers.calls if node == D][len(attempts)]
        self.assertEqual(after, first)
        expected = expected_copies(self.engine, m, A)[D]
        self.assertEqual({k for k, _ in self.peers.engine(D).scan("", 10**6)}, expected)

    def test_a_stream_that_dies_of_an_unexpected_error_starts_again(self) -> None:
        """
        An error the stream does not expect (a bug, an exception type no one
        mapped) is logged, shown as ``last_error``, and the stream starts again
        from its saved progress a few seconds later, rather than leaving the
        move waiting for a task that is gone.
        """
        fill(self.engine, 300)
        m = joining()
        real = self.peers.send_stream
        failures = [RuntimeError("unexpected")]

        def flaky(node: str, ops: Any, epoch: int | None) -> Any:
            if failures:
                return fail(failures.pop())
            return real(node, ops, epoch)

        self.peers.send_stream = flaky  # type: ignore[method-assign]
        self.learn(m)
        self.drive(lambda: self.stream()["last_error"] is not None, seconds=1.0)
        self.assertIn("unexpected", self.stream()["last_error"])
        self.assertEqual(len(self.flushLoggedErrors(FirstError)), 1)
        self.drive(self.stream_done)
        self.assertEqual(self.stream()["state"], "done")
        expected = expected_copies(self.engine, m, A)[D]
        self.assertEqual({k for k, _ in self.peers.engine(D).scan("", 10**6)}, expected)

    def test_a_write_taken_in_the_fences_grace_is_sent_again_after_it(self) -> None:
        """
        The stream starts at once, while the node still takes calls of the
        epoch before (FENCE_GRACE after it learned the move). A write of that
        epoch taken in the grace, behind the scan's cursor, is sent again
        once the grace is over; after a restart, when such writes are not
        known, every copy is sent once more.
        """
        fill(self.engine, 300)
        mapstore = MapStore(A, self.engine, self.clock, FENCE_GRACE)
        mapstore.load()
        mover = Mover(A, self.engine, mapstore, self.peers, self.clock, 64)
        mover.start()
        m = joining()
        self.learn(m, mapstore)
        key = min(expected_copies(self.engine, m, A)[D])
        while key not in self.peers.sent(D):
            self.clock.advance(0.01)
        self.assertLess(self.clock.seconds(), 100.0 + FENCE_GRACE, "sent within the grace")
        late = Record(Version(9, 1, "late"), b"written in the grace")
        self.successResultOf(self.engine.put(key, late))
        mapstore.note_grace_write(key)
        self.drive(lambda: self.stream_done(mover))
        self.assertEqual(self.peers.engine(D).get(key), late)
        self.assertTrue(_json(self.engine.get_meta(stream_meta(m.epoch)))["caught_up"])

        restarted = MapStore(A, self.engine, self.clock, FENCE_GRACE)
        restarted.load()
        self.assertIsNone(restarted.grace_writes())

    def test_a_restarted_node_resumes_after_its_last_acknowledged_round(self) -> None:
        """
        Kill the node (no stop) while batches are unanswered: a new map store
        and mover over the same engine resume from the persisted cursor, send
        nothing from before it again, and end with every copy delivered and
        counters equal to the plan's.
        """
        fill(self.engine, 3000)
        m = joining()
        plan = self.result(self.mover.plan(m))
        self.peers.holding = True
        self.learn(m)
        self.drive(lambda: len(self.peers.held) >= 1)
        # Answer the first two batches, hold the third and the ones after it.
        for _ in range(2):
            self.drive(lambda: len(self.peers.held) >= 1)
            d = self.peers.held.pop(0)
            _, node, keys, _ = self.peers.calls[len(self.peers.calls) - len(self.peers.held) - 1]
            for key in keys:
                self.peers.engine(node).put(key, self.engine.get(key))  # type: ignore[arg-type]
            d.callback([codec.Result(200, applied=True)] * len(keys))
        self.drive(lambda: len(self.peers.held) >= 1)
        saved = StreamProgress(**_json(self.engine.get_meta(stream_meta(m.epoch))))
        self.assertNotEqual(saved.cursor, "")
        self.assertEqual(saved.state, "streaming")
        sent_before = len(self.peers.calls)

        self.peers.holding = False
        _, mover = self.boot(A)  # the restarted process; the old one is gone
        self.drive(lambda: self.stream_done(mover))
        resent = [k for _, _, keys, _ in self.peers.calls[sent_before:] for k in keys]
        self.assertTrue(resent)
        self.assertTrue(all(k > saved.cursor for k in resent))
        expected = expected_copies(self.engine, m, A)[D]
        self.assertEqual({k for k, _ in self.peers.engine(D).scan("", 10**6)}, expected)
        status = self.stream(mover)
        self.assertEqual(status["keys_moved"], plan["pairs"][0]["keys"])
        self.assertEqual(status["bytes_moved"], plan["pairs"][0]["bytes"])
        self.assertEqual(status["keys_scanned"], 3001)

        _, again = self.boot(A)  # done is durable: a third start sends nothing
        before = len(self.peers.calls)
        self.drive(lambda: False, seconds=5.0)
        self.assertEqual(len(self.peers.calls), before)
        self.assertEqual(self.stream(again)["state"], "done")

    def test_the_rate_cap_paces_the_stream_by_the_clock(self) -> None:
        """
        With move.rate 3000 keys/s for three previous nodes, the node's share
        is 1000 primary copies a second: the copies leave in small batches
        spread over the time that takes, where an uncapped stream sends
        everything without the clock moving.
        """
        fill(self.engine, 6000)
        capped = joining(rate=3000)
        self.learn(capped)
        start = self.clock.seconds()
        self.drive(self.stream_done)
        moved = self.stream()["keys_moved"]
        elapsed = self.clock.seconds() - start
        self.assertGreater(moved, 300)
        self.assertGreaterEqual(elapsed, (moved - 100) / 1000)
        self.assertLessEqual(elapsed, moved / 1000 + 1.0)
        self.assertTrue(all(len(keys) <= 100 for _, _, keys, _ in self.peers.calls))

        self.setUp()
        fill(self.engine, 6000)
        self.learn(joining())
        start = self.clock.seconds()
        self.drive(self.stream_done)
        self.assertEqual(self.clock.seconds(), start)
        self.assertEqual(self.stream()["keys_moved"], moved)

    def test_a_capped_stream_reads_few_records_per_reactor_turn(self) -> None:
        """
        Under a rate cap a stream scans L{PACED_RECORDS} records per reactor
        turn, not the node's C{batch_records} (512 records hold a busy
        node's reactor for tens of milliseconds, and the reads it serves
        with it); an uncapped stream keeps the big turns.
        """
        for m, per_turn in ((joining(rate=3000), PACED_RECORDS), (joining(), 512)):
            self.setUp()
            limits: list[int] = []
            real = self.engine.scan

            def scan(
                start: str = "", limit: int = 1000, real: Any = real, limits: Any = limits
            ) -> Any:
                limits.append(limit)
                return real(start, limit)

            self.engine.scan = scan  # type: ignore[method-assign]
            fill(self.engine, 3000)
            self.mapstore, self.mover = self.boot(A, batch_records=512)
            self.learn(m)
            self.drive(self.stream_done)
            self.assertEqual(set(limits), {per_turn + 1})
            self.assertGreater(self.stream()["keys_moved"], 0)

    def test_a_plan_says_its_map_to_the_proxies(self) -> None:
        """The map a plan is asked about is noted in the node's map store, whose
        ``GET /replica/map`` then names it, for every proxy to build its rings."""
        fill(self.engine, 100)
        self.learn(cluster())
        m = joining()
        self.result(self.mover.plan(m))
        self.assertEqual(self.mapstore.as_json()["planned"], m.to_json())

    def test_a_newer_map_stops_the_stream_of_an_older_epoch(self) -> None:
        """
        An abort (a newer epoch, handover) while batches are in flight cancels
        them and the task: nothing more is sent, and the status, which is for
        the learned epoch, shows no stream.
        """
        fill(self.engine, 600)
        m = joining()
        self.peers.holding = True
        self.learn(m)
        self.drive(lambda: len(self.peers.held) >= 1)
        sent = len(self.peers.calls)
        self.learn(abort(m))
        self.assertEqual(self.peers.cancelled, len(self.peers.held))
        self.assertIsNone(self.mover.stream)
        self.peers.holding = False
        self.drive(lambda: False, seconds=30.0)
        self.assertEqual(len(self.peers.calls), sent)
        status = self.mover.status()
        self.assertEqual((status["epoch"], status["phase"]), (m.epoch + 1, "handover"))
        self.assertEqual(status["stream"]["state"], "idle")

    def test_nothing_to_send_is_done_at_once(self) -> None:
        """With copy false, or on a node new to the ring, a stream sends nothing and is done."""
        fill(self.engine, 100)
        m = abort(next_phase(joining()))  # copying again, with copy: false
        assert m.move is not None and not m.move.copy
        self.learn(joining())
        self.learn(m)
        self.drive(lambda: False, seconds=1.0)
        self.assertEqual(self.stream()["state"], "done")

        self.engine = MetaEngine()
        mapstore, mover = self.boot(D)
        before = len(self.peers.calls)
        self.learn(joining(), mapstore)
        self.assertEqual(self.stream(mover)["state"], "done")
        self.assertEqual(len(self.peers.calls), before)

    def test_a_copy_the_destination_refuses_for_good_is_counted_not_retried(self) -> None:
        """
        A record refused with a 4xx of its own (a version the destination will
        not store) is counted and named; one refused with a 5xx (its disk)
        sends the batch again.
        """
        fill(self.engine, 600)
        m = joining()
        victim = sorted(expected_copies(self.engine, m, A)[D])[0]
        failures = {"disk": 1}

        def answer(op: codec.PutOp) -> codec.Result:
            if op.key == victim:
                return codec.Result(400, error="invalid_version", message="from the future")
            if failures["disk"] and op.key != victim:
                failures["disk"] -= 1
                return codec.Result(507, error="storage_full", message="disk full")
            return codec.Result(200, applied=True)

        self.peers.answer = answer
        self.learn(m)
        self.drive(self.stream_done)
        status = self.stream()
        self.assertEqual(status["copies_refused"], 1)  # counted once the batch went through
        self.assertIn(victim, status["last_error"] or "")  # kept: the status tells the operator
        expected = expected_copies(self.engine, m, A)[D] - {victim}
        self.assertEqual({k for k, _ in self.peers.engine(D).scan("", 10**6)}, expected)

    def test_a_record_too_large_for_a_stream_goes_alone(self) -> None:
        """A record over the stream's byte bound is sent with a single replica put."""
        fill(self.engine, 200)
        m = joining()
        big_key = sorted(expected_copies(self.engine, m, A)[D])[0]
        big = Record(Version(9, 9, "w"), b"x" * (codec.MAX_STREAM_BYTES + 1), "text/plain")
        self.engine._records[big_key] = big
        self.learn(m)
        self.drive(self.stream_done)
        self.assertEqual(self.peers.engine(D).get(big_key), big)
        self.assertNotIn(big_key, self.peers.sent(D))


class CleanupTests(MoverCase):
    def test_cleanup_deletes_exactly_the_records_the_node_does_not_own(self) -> None:
        """
        Under a cleanup map a node keeps the records of which it is one of the
        first n of the current ring and deletes the rest, counts them, drops
        the hints for nodes out of the ring and keeps the others'.
        """
        fill(self.engine, 800)
        self.engine.put_hint(E, "h1", record(1))
        self.engine.put_hint(B, "h2", record(2))
        m = stage(cluster((A, B, C, D, E)), remove=[E])
        m = next_phase(next_phase(m))  # cleanup
        ring = m.current_ring()
        before = dict(self.engine.scan("", 10**6))
        owned = {k for k in before if owns(ring, 3, A, hash_key(k))}
        self.assertTrue(0 < len(owned) < len(before))
        self.learn(cluster((A, B, C, D, E)))
        self.learn(m)
        self.drive(lambda: self.mover.status()["cleanup"]["state"] == "done")
        self.assertEqual({k for k, _ in self.engine.scan("", 10**6)}, owned)
        cleanup = self.mover.status()["cleanup"]
        gone = [k for k in before if k not in owned]
        self.assertEqual(cleanup["keys_deleted"], len(gone))
        self.assertEqual(cleanup["bytes_deleted"], sum(record_bytes(k, before[k]) for k in gone))
        self.assertEqual(cleanup["hints_dropped"], 1)
        self.assertEqual(self.engine.hint_counts(), {B: 1})

        _, again = self.boot(A)  # done is durable
        self.assertEqual(again.status()["cleanup"]["state"], "done")
        self.assertIsNone(again.cleanup)

    def test_a_node_out_of_the_ring_deletes_everything(self) -> None:
        fill(self.engine, 300)
        mapstore, mover = self.boot(E)
        m = next_phase(next_phase(stage(cluster((A, B, C, D, E)), remove=[E])))
        self.learn(cluster((A, B, C, D, E)), mapstore)
        self.learn(m, mapstore)
        self.drive(lambda: mover.status()["cleanup"]["state"] == "done")
        self.assertEqual(list(self.engine.scan("", 10)), [])
        self.assertEqual(mover.status()["cleanup"]["keys_deleted"], 301)

    def test_a_cleanup_resumes_from_its_cursor(self) -> None:
        """A node killed mid-cleanup resumes after the last chunk it committed."""
        fill(self.engine, 800)
        m = next_phase(next_phase(stage(cluster((A, B, C, D, E)), remove=[E])))
        ring = m.current_ring()
        before = {k for k, _ in self.engine.scan("", 10**6)}
        self.learn(cluster((A, B, C, D, E)))
        # The map's install, the cleanup's first record (after the fence's grace)
        # and two chunks' cursors are stored; the third chunk's cannot be.
        self.engine.meta_writes_left = 4
        self.learn(m)
        self.drive(lambda: False, seconds=3.0)
        partial = self.mover.status()["cleanup"]
        self.assertEqual(partial["state"], "running")
        self.assertIn("disk full", partial["last_error"])
        self.assertEqual(partial["keys_scanned"], 3 * 64)
        saved = _json(self.engine.get_meta("move/4/cleanup"))
        self.assertEqual(saved["keys_scanned"], 2 * 64)
        self.engine.meta_writes_left = None
        _, mover = self.boot(A)  # killed and restarted
        self.drive(lambda: mover.status()["cleanup"]["state"] == "done")
        remaining = {k for k, _ in self.engine.scan("", 10**6)}
        self.assertEqual(remaining, {k for k in before if owns(ring, 3, A, hash_key(k))})
        # What the lost chunk deleted before the crash is gone, and not counted again.
        self.assertLessEqual(
            mover.status()["cleanup"]["keys_deleted"], len(before) - len(remaining)
        )


def _json(raw: bytes | None) -> dict[str, Any]:
    import json

    assert raw is not None
    data: dict[str, Any] = json.loads(raw)
    return data
