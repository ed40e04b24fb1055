"""One node's queue of replica operations, sent as batches.

Why: see L{shardkv.replica.codec}. A pipeline keeps at most ``depth`` batches
in flight to its node. While all of them are out, new operations wait in a
queue, and the next batch to leave takes everything that waited (up to
L{MAX_OPS}). So a lightly loaded proxy sends each operation at once, alone,
and a busy one sends fewer, larger batches: the batch size follows the load
with no timer and no added latency (the same idea as group commit).

Each batch that leaves is counted in the pipeline's L{PipelineMeter}, which
its replica client keeps per node and kind across epochs (so ``/cluster``'s
totals and ``shardkv_pipeline_batches_total`` do not restart with a new map).

A batch's answer settles each operation by a plain call (L{NodePipeline.submit_to}:
its caller's function and tag), with no Deferred per operation: at one
connection every replica operation is a batch of one, and the chain of
Deferreds per operation cost more than the pipeline's own work.
L{NodePipeline.submit} wraps that in a Deferred for callers off the hot path.

Every operation has its own deadline, counted from when it was submitted,
so time spent queued behind a slow batch counts too (one timer per pipeline
keeps them all). An operation that is
cancelled or expires before its batch leaves is never sent, and a batch
whose every operation was cancelled (the clients hung up) is cancelled too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from shardkv.errors import NodeBusy, NodeTimeout
from shardkv.metrics import PipelineMeter
from shardkv.replica.codec import MAX_OPS, Op, Result

log = Logger(namespace="shardkv.replica.pipeline")

Send = Callable[[str, Sequence[Op]], Deferred[list[Result]]]

Settle = Callable[[Any, Any], object]
"""Called once with an operation's outcome (its L{Result}, or the exception it
failed with) and the tag its caller gave: how a batch's answer reaches the
caller directly, with no Deferred per operation."""


class _Pending:
    """One operation, queued or sent; what its caller holds to cancel it."""

    __slots__ = ("batch", "deadline", "done", "op", "owner", "sent", "settle_to", "tag")

    def __init__(
        self, op: Op, owner: NodePipeline, deadline: float, settle_to: Settle, tag: Any
    ) -> None:
        self.op = op
        self.owner = owner
        self.deadline = deadline
        self.settle_to = settle_to
        self.tag = tag
        self.sent = False
        self.done = False
        self.batch: _Batch | None = None

    def cancel(self) -> None:
        """The caller gave up: never send it (if queued), ignore its answer (if
        sent), and cancel its batch once nobody waits for any of it."""
        if not self.done:
            self.done = True
            self.owner._settled()
        if self.batch is not None:
            self.batch.abandoned_by(self)

    def settle(self, outcome: Result | BaseException) -> None:
        if self.done:
            return
        self.done = True
        self.owner._settled()
        tag, self.tag = self.tag, None  # the caller's objects hold this one: no cycle left
        try:
            self.settle_to(outcome, tag)
        except Exception:
            # A caller's bug must not strand the other operations of its batch.
            log.failure("settling a replica operation")


class _Refused:
    """What L{NodePipeline.submit_to} returns for an operation it refused at once."""

    __slots__ = ()

    def cancel(self) -> None:
        pass


_REFUSED = _Refused()


def _fire(outcome: Result | BaseException, d: Deferred[Result]) -> None:
    if isinstance(outcome, BaseException):
        d.errback(outcome)
    else:
        d.callback(outcome)


class _Batch:
    """Operations that left together; cancelled once nobody waits for any of them."""

    __slots__ = ("deferred", "pending")

    def __init__(self, pending: list[_Pending]) -> None:
        self.pending = pending
        self.deferred: Deferred[list[Result]] | None = None
        for p in pending:
            p.sent = True
            p.batch = self

    def abandoned_by(self, leaving: _Pending) -> None:
        if self.deferred is not None and all(p is leaving or p.done for p in self.pending):
            self.deferred.cancel()


class NodePipeline:
    def __init__(
        self,
        node: str,
        send: Send,
        clock: IReactorTime,
        timeout: float,
        depth: int,
        max_queued: int = 10_000,
        meter: PipelineMeter | None = None,
    ) -> None:
        self.node = node
        self._send = send
        self._clock = clock
        self._timeout = timeout
        self.depth = depth
        self.max_queued = max_queued
        self._queue: deque[_Pending] = deque()
        self._by_deadline: deque[_Pending] = deque()
        self._unsettled = 0
        self._timer: IDelayedCall | None = None
        self._sweeping = False
        self.in_flight = 0
        self.meter = meter if meter is not None else PipelineMeter(None)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def set_timeout(self, seconds: float) -> None:
        """The timeout of operations submitted from now on (a reload changed it).

        Deadlines are swept in submission order, so while operations from
        before a shorter timeout are waiting, newer ones may expire up to the
        old timeout late; no operation waits longer than the old timeout."""
        self._timeout = seconds

    def submit(self, op: Op) -> Deferred[Result]:
        """The node's answer to ``op``, or a L{shardkv.errors.ReplicaCallFailed};
        cancelling the Deferred cancels the operation."""
        d: Deferred[Result] = Deferred(lambda _: handle.cancel())
        handle = self.submit_to(op, _fire, d)
        return d

    def submit_to(self, op: Op, settle_to: Settle, tag: Any) -> _Pending | _Refused:
        """Queue ``op``; ``settle_to(outcome, tag)`` is called once with the node's
        L{Result} or the exception it failed with (a
        L{shardkv.errors.ReplicaCallFailed}), unless it is cancelled first. A
        full queue calls it at once with L{NodeBusy}. Returns what cancels it.
        """
        if len(self._queue) >= self.max_queued:
            settle_to(NodeBusy(self.node, len(self._queue)), tag)
            return _REFUSED
        pending = _Pending(op, self, self._clock.seconds() + self._timeout, settle_to, tag)
        self._unsettled += 1
        self._by_deadline.append(pending)
        if self._timer is None and not self._sweeping:
            self._timer = self._clock.callLater(self._timeout, self._expire_due)
        self._queue.append(pending)
        self._flush()
        return pending

    def _settled(self) -> None:
        self._unsettled -= 1
        if self._unsettled == 0:
            self._by_deadline.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _expire_due(self) -> None:
        """Fail every operation whose deadline has passed, then wait for the next.

        Every operation gets the same timeout, so deadlines are in submission
        order: one timer per pipeline replaces a timer per operation, which
        cost the proxy more than the rest of the pipeline under load.
        """
        self._timer = None
        self._sweeping = True
        try:
            now = self._clock.seconds()
            due = self._by_deadline
            while due and (due[0].done or due[0].deadline <= now):
                pending = due.popleft()
                if not pending.done:
                    pending.settle(NodeTimeout(self.node, self._timeout, sent=pending.sent))
        finally:
            self._sweeping = False
        if self._by_deadline and self._timer is None:
            delay = max(0.0, self._by_deadline[0].deadline - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._expire_due)

    def _flush(self) -> None:
        while self._queue and self.in_flight < self.depth:
            taken: list[_Pending] = []
            while self._queue and len(taken) < MAX_OPS:
                pending = self._queue.popleft()
                if not pending.done:
                    taken.append(pending)
            if not taken:
                return
            self.in_flight += 1
            self.meter.batch(len(taken))
            batch = _Batch(taken)
            sent = self._send(self.node, [p.op for p in taken])
            batch.deferred = sent
            sent.addBoth(self._landed, batch)

    def _landed(self, outcome: list[Result] | Failure, batch: _Batch) -> None:
        self.in_flight -= 1
        if isinstance(outcome, Failure):
            error = cast(BaseException, outcome.value)
            for pending in batch.pending:
                pending.settle(error)
        else:
            for pending, result in zip(batch.pending, outcome, strict=True):
                pending.settle(result)
        batch.pending = []  # each holds its batch: free them without the cycle collector
        self._flush()

    def stats(self) -> dict[str, int]:
        return {
            "in_flight": self.in_flight,
            "queued": self.queued,
            "batches": self.meter.batches,
            "ops": self.meter.ops,
        }
