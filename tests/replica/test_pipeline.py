"""
Tests for L{shardkv.replica.pipeline}: the per-node queue that builds batches.

The pipeline runs against a fake C{send} whose Deferreds the test answers,
on a C{MemoryReactorClock}, so every interleaving of submissions, answers,
cancellations and deadlines can be set up exactly. The promises pinned
down: no added latency when idle, results matched by position, one
operation's deadline counted from its submission, and nothing sent that
nobody waits for.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.records import Record
from shardkv.errors import NodeBusy, NodeTimeout, NodeUnreachable
from shardkv.replica.codec import MAX_OPS, GetOp, Op, PutOp, Result
from shardkv.replica.pipeline import NodePipeline
from tests.replica.helpers import NODE_ID, TIMEOUT, V1, V2


def echo(op: Op) -> Result:
    """A result that names the operation it answers, to check results land positionally."""
    return Result(200, record=Record(V1, op.key.encode("utf-8")))


class FakeNode:
    """The pipeline's C{send}: records every batch and lets the test answer it."""

    def __init__(self) -> None:
        self.batches: list[list[Op]] = []
        self.answers: list[Deferred[list[Result]]] = []

    def send(self, node: str, batch: Sequence[Op]) -> Deferred[list[Result]]:
        assert node == NODE_ID
        d: Deferred[list[Result]] = Deferred()
        self.batches.append(list(batch))
        self.answers.append(d)
        return d

    def sent_keys(self) -> list[list[str]]:
        return [[op.key for op in batch] for batch in self.batches]

    def answer(self, index: int) -> None:
        """Answer batch ``index`` with one L{echo} per operation."""
        self.answers[index].callback([echo(op) for op in self.batches[index]])


class PipelineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = FakeNode()

    def pipeline(self, depth: int = 1, max_queued: int = 10_000) -> NodePipeline:
        return NodePipeline(NODE_ID, self.node.send, self.clock, TIMEOUT, depth, max_queued)

    def submit(self, pipeline: NodePipeline, *names: str) -> list[Deferred[Result]]:
        return [pipeline.submit(GetOp(name)) for name in names]

    def assertEchoes(self, answers: list[Deferred[Result]], names: Sequence[str]) -> None:
        got = [self.successResultOf(d) for d in answers]
        self.assertEqual(got, [echo(GetOp(name)) for name in names])

    def assertNoTimers(self) -> None:
        """Every settled operation cancelled its deadline: nothing is left on the clock."""
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_op_leaves_at_once_alone(self) -> None:
        """
        An idle pipeline sends an operation the moment it is submitted, in a
        batch of its own: batching must add no latency when there is no load.
        """
        pipeline = self.pipeline()
        (d,) = self.submit(pipeline, "a")
        self.assertEqual(self.node.sent_keys(), [["a"]])
        self.assertNoResult(d)
        self.node.answer(0)
        self.assertEchoes([d], ["a"])
        self.assertNoTimers()

    def test_ops_wait_for_a_free_slot_and_leave_together(self) -> None:
        """
        With ``depth`` batches out, new operations wait; when one batch
        lands, everything that waited leaves as one batch, in submission
        order, while the other batch is still out.
        """
        pipeline = self.pipeline(depth=2)
        first = self.submit(pipeline, "a", "b")
        self.assertEqual(self.node.sent_keys(), [["a"], ["b"]])
        waiting = self.submit(pipeline, "c", "d", "e")
        self.assertEqual(len(self.node.batches), 2)
        self.assertEqual(pipeline.stats()["queued"], 3)
        for d in waiting:
            self.assertNoResult(d)

        self.node.answer(1)
        self.assertEqual(self.node.sent_keys(), [["a"], ["b"], ["c", "d", "e"]])
        self.assertEchoes(first[1:], ["b"])
        self.assertNoResult(first[0])

        self.node.answer(0)
        self.node.answer(2)
        self.assertEchoes(first[:1] + waiting, ["a", "c", "d", "e"])
        self.assertEqual(len(self.node.batches), 3)
        self.assertNoTimers()

    def test_a_batch_never_exceeds_max_ops(self) -> None:
        """
        MAX_OPS + 10 operations queued behind a busy node leave as a batch of
        MAX_OPS and then one of 10, each op answered by its own result.
        """
        pipeline = self.pipeline()
        names = [f"k{i}" for i in range(MAX_OPS + 11)]
        answers = self.submit(pipeline, *names)
        self.assertEqual([len(b) for b in self.node.batches], [1])
        self.node.answer(0)
        self.assertEqual([len(b) for b in self.node.batches], [1, MAX_OPS])
        self.node.answer(1)
        self.assertEqual([len(b) for b in self.node.batches], [1, MAX_OPS, 10])
        self.node.answer(2)
        self.assertEqual([key for keys in self.node.sent_keys() for key in keys], names)
        self.assertEchoes(answers, names)
        self.assertNoTimers()

    def test_results_are_matched_by_position(self) -> None:
        """The n-th result of a batch answers its n-th operation, puts and gets alike."""
        pipeline = self.pipeline()
        self.submit(pipeline, "first")
        get = pipeline.submit(GetOp("g"))
        put = pipeline.submit(PutOp("p", Record(V2, b"v"), "127.0.0.1:8085"))
        missing = pipeline.submit(GetOp("m"))
        self.node.answer(0)
        self.assertEqual(
            self.node.batches[1],
            [GetOp("g"), PutOp("p", Record(V2, b"v"), "127.0.0.1:8085"), GetOp("m")],
        )
        answers = [
            Result(200, record=Record(V1, b"g")),
            Result(200, applied=True),
            Result(404, error="not_found", message="no record"),
        ]
        self.node.answers[1].callback(answers)
        self.assertEqual(
            [self.successResultOf(d) for d in (get, put, missing)],
            answers,
        )

    def test_a_failed_batch_fails_every_op_in_it(self) -> None:
        """
        A batch that breaks as a whole (the connection dropped mid-request)
        fails every operation in it with that same error, so each caller
        learns the write may have happened; the next batch still leaves.
        """
        pipeline = self.pipeline()
        self.submit(pipeline, "a")
        in_batch = self.submit(pipeline, "b", "c", "d")
        self.node.answer(0)
        later = self.submit(pipeline, "e")
        self.node.answers[1].errback(NodeUnreachable(NODE_ID, "the connection broke", sent=True))
        for d in in_batch:
            error = self.failureResultOf(d, NodeUnreachable).value
            assert isinstance(error, NodeUnreachable)
            self.assertTrue(error.sent)
        self.assertEqual(self.node.sent_keys()[2], ["e"])
        self.node.answer(2)
        self.assertEchoes(later, ["e"])
        self.assertNoTimers()

    def test_an_op_queued_past_its_deadline_is_never_sent(self) -> None:
        """
        The deadline counts from submission. An operation still queued behind
        a stuck batch when it runs out fails with NodeTimeout(sent=False) (a
        write that surely did not happen) and is dropped from the queue.
        """
        pipeline = self.pipeline()
        (stuck,) = self.submit(pipeline, "a")
        self.clock.advance(1.0)
        (queued,) = self.submit(pipeline, "b")
        self.clock.advance(TIMEOUT - 1.0)
        self.assertTrue(self.failureResultOf(stuck, NodeTimeout).value.sent)
        self.assertNoResult(queued)
        self.clock.advance(1.0)
        error = self.failureResultOf(queued, NodeTimeout).value
        assert isinstance(error, NodeTimeout)
        self.assertEqual((error.sent, error.node, error.seconds), (False, NODE_ID, TIMEOUT))

        self.node.answer(0)  # the stuck batch lands at last
        self.assertEqual(self.node.sent_keys(), [["a"]])
        self.assertEqual(pipeline.stats(), {"in_flight": 0, "queued": 0, "batches": 1, "ops": 1})
        self.assertNoTimers()

    def test_time_spent_queued_counts_against_the_deadline(self) -> None:
        """
        An operation that waited 1.5 s in the queue has 0.5 s left once sent,
        and then fails with NodeTimeout(sent=True): its outcome is unknown.
        """
        pipeline = self.pipeline()
        self.submit(pipeline, "a")
        (waited,) = self.submit(pipeline, "b")
        self.clock.advance(1.5)
        self.node.answer(0)
        self.assertEqual(self.node.sent_keys()[1], ["b"])
        self.clock.advance(0.49)
        self.assertNoResult(waited)
        self.clock.advance(0.02)
        error = self.failureResultOf(waited, NodeTimeout).value
        assert isinstance(error, NodeTimeout)
        self.assertTrue(error.sent)

    def test_a_late_answer_is_ignored(self) -> None:
        """
        An operation sent but not answered by its deadline fails with
        NodeTimeout(sent=True); the answer (or failure) arriving afterwards
        changes nothing, logs no error, and frees the slot for the next batch.
        """
        pipeline = self.pipeline()
        (late_ok,) = self.submit(pipeline, "a")
        self.clock.advance(TIMEOUT)
        self.assertTrue(self.failureResultOf(late_ok, NodeTimeout).value.sent)
        (late_fail,) = self.submit(pipeline, "b")
        self.assertEqual(len(self.node.batches), 1, "sent while the first batch was out")

        self.node.answer(0)
        self.assertEqual(self.node.sent_keys(), [["a"], ["b"]])
        self.clock.advance(TIMEOUT)
        self.failureResultOf(late_fail, NodeTimeout)
        self.node.answers[1].errback(NodeUnreachable(NODE_ID, "reset", sent=True))

        gc.collect()  # an unhandled failure in a Deferred is logged when it is collected
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(pipeline.in_flight, 0)
        (d,) = self.submit(pipeline, "c")
        self.assertEqual(self.node.sent_keys()[-1], ["c"])
        self.node.answer(2)
        self.assertEchoes([d], ["c"])
        self.assertNoTimers()

    def test_a_cancelled_queued_op_is_never_sent(self) -> None:
        """
        A caller that gives up (the client hung up) cancels its operation;
        one still queued is dropped, so the node never does work nobody
        waits for; once nothing is left waiting, the deadline timer goes too.
        """
        pipeline = self.pipeline()
        self.submit(pipeline, "a")
        b, c = self.submit(pipeline, "b", "c")
        b.cancel()
        self.failureResultOf(b, CancelledError)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "one timer per pipeline")
        self.node.answer(0)
        self.assertEqual(self.node.sent_keys(), [["a"], ["c"]])
        self.node.answer(1)
        self.assertEchoes([c], ["c"])
        self.assertNoTimers()

    def test_a_cancelled_sent_op_ignores_its_answer(self) -> None:
        """
        Cancelling an operation already sent settles it at once; when its
        batch lands, its neighbours get their results and its own is dropped
        without an error.
        """
        pipeline = self.pipeline()
        self.submit(pipeline, "a")
        b, c = self.submit(pipeline, "b", "c")
        self.node.answer(0)
        self.assertEqual(self.node.sent_keys()[1], ["b", "c"])
        b.cancel()
        self.failureResultOf(b, CancelledError)
        self.node.answer(1)
        self.assertEchoes([c], ["c"])
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertNoTimers()

    def test_a_batch_nobody_waits_for_is_cancelled(self) -> None:
        """
        Once every operation of a sent batch is cancelled (all their clients
        hung up), the batch itself is cancelled, so the node's connection is
        closed rather than left to answer no one; a batch with one live
        operation left goes on, and the freed slot sends the next batch.
        """
        pipeline = self.pipeline()
        self.submit(pipeline, "a")
        b, c = self.submit(pipeline, "b", "c")
        self.node.answer(0)
        b.cancel()
        self.assertFalse(self.node.answers[1].called)
        c.cancel()
        self.assertTrue(self.node.answers[1].called)
        for gone in (b, c):
            self.failureResultOf(gone, CancelledError)
        (d,) = self.submit(pipeline, "d")
        self.assertEqual(self.node.sent_keys()[2], ["d"])
        self.node.answer(2)
        self.assertEchoes([d], ["d"])
        self.assertNoTimers()

    def test_a_full_queue_answers_busy_at_once(self) -> None:
        """
        Past ``max_queued`` waiting operations, a submit fails immediately
        with NodeBusy and sends nothing: memory stays bounded when a node
        falls behind, and the node is not taken for dead.
        """
        pipeline = self.pipeline(max_queued=2)
        self.submit(pipeline, "a", "b", "c")
        (d,) = self.submit(pipeline, "d")
        error = self.failureResultOf(d, NodeBusy).value
        assert isinstance(error, NodeBusy)
        self.assertEqual((error.node, error.queued), (NODE_ID, 2))
        self.assertEqual(pipeline.stats()["queued"], 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "one timer per pipeline")

        self.node.answer(0)
        self.assertEqual(self.node.sent_keys(), [["a"], ["b", "c"]])
        (e,) = self.submit(pipeline, "e")
        self.assertNoResult(e)

    def test_stats_count_batches_and_ops(self) -> None:
        """
        stats() shows what is out and waiting, and how many batches and
        operations were sent, so an operator can see batching happen.
        """
        pipeline = self.pipeline()
        empty = {"in_flight": 0, "queued": 0, "batches": 0, "ops": 0}
        self.assertEqual(pipeline.stats(), empty)
        self.submit(pipeline, "a", "b", "c", "d")
        self.assertEqual(pipeline.stats(), {"in_flight": 1, "queued": 3, "batches": 1, "ops": 1})
        self.node.answer(0)
        self.assertEqual(pipeline.stats(), {"in_flight": 1, "queued": 0, "batches": 2, "ops": 4})
        self.node.answer(1)
        self.assertEqual(pipeline.stats(), {"in_flight": 0, "queued": 0, "batches": 2, "ops": 4})
