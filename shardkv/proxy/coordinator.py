"""The coordinator: runs each client request as quorum calls to the replicas.

A key lives on the first N distinct nodes of its preference list. A read is
hedged (L{_Read}): it asks the first R healthy replicas and answers once R have
replied, with the newest version seen; it asks the others only when one of
those fails or has not answered within the hedge delay, and one read in ten
(L{READ_ALL_FRACTION}), like every read while a move runs, asks all N. The
replicas it asked that were stale are repaired in the background. A write first reads
the newest version (R replies) so that it can mint a larger one, then sends
the record to the N replicas in parallel and answers once W have durably
acknowledged it. Neither waits for the slowest replica.

When a quorum cannot be had it raises:

- L{QuorumUnavailable}: W (or R) cannot be reached; the details say how many
  replicas acknowledged, and whether the write may still have been applied
  on some of them (``"outcome": "unknown"``) or not at all;
- L{QuorumTimeout}: the quorum was still possible but replicas did not
  answer in time; for a write the outcome is unknown, never a failure;
- L{Overloaded}: the quorum failed only because replicas were busy (each had
  its cap of bytes in flight, L{NodeBusy}), so nothing was sent anywhere and
  a retry shortly after may succeed. A write checks every target for room
  before it sends anything: if fewer than W have room it is refused whole,
  rather than sent to one replica and then reported as "unknown". An
  outcome that may have been applied is never "overloaded".

Replicas that missed a write are the business of L{shardkv.proxy.hints}.

Placement comes from the cluster map (L{shardkv.cluster.view.MapView}). Each
operation captures the view's placement when it is planned and sends every
replica call at that epoch. Between moves there is one ring and the rules
above hold as they are. While a move runs its ``copying`` and ``handover``
phases, reads use the map's read ring and a write whose previous and current
replica sets differ goes to both and needs W acknowledgements in each
(L{JointWriteQuorum}); it uses no stand-ins, since a hinted copy counts in
neither set, but replicas that missed it still get hints.

A node that learned a newer map refuses a call planned at an older one
(L{NodeHasNewerMap}, nothing applied) and the replica client's hook installs
that map. A read, or a write known not to have been applied, that failed
while the epoch changed is run once more at the new epoch. A write whose
replicate step met such refusals sends the same record (same version) again
at the new placement, which is idempotent, instead of answering "unknown".
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from shardkv.cluster.view import MapView, Placement
from shardkv.core.conditions import Precondition
from shardkv.core.placement import Ring
from shardkv.core.quorum import (
    AnyWriteQuorum,
    Consistency,
    JointWriteQuorum,
    LatencyWindow,
    Outcome,
    QuorumSizes,
    ReadQuorum,
    Reply,
    Target,
    WriteQuorum,
    quorum_sizes,
    replica_targets,
)
from shardkv.core.records import Record
from shardkv.core.versions import Version, VersionClock
from shardkv.core.writes import WriteResult, next_tombstone, next_value
from shardkv.errors import (
    NodeBusy,
    NodeHasNewerMap,
    Overloaded,
    QuorumTimeout,
    QuorumUnavailable,
    ReplicaCallFailed,
)
from shardkv.metrics import ProxyMetrics, counter_value
from shardkv.proxy.health import HealthMonitor
from shardkv.proxy.hints import HintKeeper
from shardkv.replica.client import ReplicaClient, write_cost

DEFAULT_SIZES = QuorumSizes(n=3, r=2, w=2)

_T = TypeVar("_T")


def _reply_kind(failure: Failure) -> Reply:
    """May the failed call have been applied? Only if it was sent and not answered."""
    if isinstance(failure.value, ReplicaCallFailed) and failure.value.sent:
        return Reply.UNKNOWN
    return Reply.FAILED


def _first(quorum_decided: Callable[[], bool]) -> tuple[Deferred[None], Callable[[], None]]:
    """A Deferred that fires the first time ``quorum_decided()`` holds."""
    done: Deferred[None] = Deferred()

    def check() -> None:
        if not done.called and quorum_decided():
            done.callback(None)

    return done, check


READ_ALL_FRACTION = 0.1
"""The share of reads that ask all N replicas instead of R (Cassandra's
``read_repair_chance``, at its old default). A hedged read can only compare,
and repair, the replicas it asked; a replica that is never among the first R
of a key's healthy replicas would otherwise be found stale only by a hedge or a
failure. One read in ten of a key asking everyone finds it by foreground
traffic, for 1.05 replica operations per read on average instead of 1.5
(N=3, R=2). Hinted handoff remains the main way a replica catches up. A
constant, not an option: the coordinator's ``read_all_fraction`` may be set
(tests set 0 or 1)."""

SLOW_FOR = 1.0
"""Seconds a replica that let a hedge fire (it had not answered within the
hedge delay) is asked after the others. A paused node (SIGSTOP) then costs one
hedge delay per second instead of one per read, until health marks it down."""


class _Read:
    """One quorum read in flight: which replicas were asked, which wait as spares.

    Hedged (Cassandra's speculative retry): ask the first R replicas that
    count, keep the rest as spares, and ask spares when an asked one fails
    (so that R answers can still come) or when the hedge delay passes without
    a decision (then all of them: the read is slow, so it does what an
    unhedged read does). The quorum (L{ReadQuorum}) counts un-asked spares as
    pending, so it never decides FAILED while a spare could still answer.
    Read repair compares the replicas that answered, once every replica asked
    has landed.

    One object with a method per event, rather than closures per replica
    call: a read is the proxy's hottest path.
    """

    __slots__ = (
        "asking",
        "busy",
        "calls",
        "coordinator",
        "done",
        "epoch",
        "key",
        "outstanding",
        "potential",
        "quorum",
        "repaired",
        "spares",
        "timer",
        "waiting",
    )

    def __init__(self, coordinator: Coordinator, key: str, quorum: ReadQuorum, epoch: int) -> None:
        self.coordinator = coordinator
        self.key = key
        self.quorum = quorum
        self.epoch = epoch
        self.done: Deferred[None] = Deferred()
        self.busy: set[str] = set()
        self.calls: list[Deferred[Record | None]] = []
        self.spares: list[tuple[str, bool]] = []
        self.waiting: set[str] = set()
        """Replicas asked that have not answered yet."""
        self.outstanding = 0
        self.potential = 0
        """Replicas asked, not yet answered, whose answer would count towards R."""
        self.timer: IDelayedCall | None = None
        self.repaired = False
        self.asking = 0
        """Loops of asks in progress (their answers may land within them)."""

    def ask_all(self, replicas: list[tuple[str, bool]]) -> None:
        self.asking += 1
        for node, counts in replicas:
            self.ask(node, counts)
        self.asking -= 1
        self.landed()

    def start(self, order: list[tuple[str, bool]]) -> None:
        """Ask the first R counting replicas of ``order``; keep the rest as spares."""
        self.spares = order
        self.top_up()
        if self.spares and not self.done.called:
            c = self.coordinator
            self.timer = c.clock.callLater(c.hedge_delay(), self.hedge)

    def ask(self, node: str, counts: bool) -> None:
        c = self.coordinator
        self.outstanding += 1
        self.waiting.add(node)
        if counts:
            self.potential += 1
        call = c.replica_client.replica_get(node, self.key, epoch=self.epoch)
        call.addCallbacks(
            self.ok,
            self.failed,
            callbackArgs=(node, counts, c.clock.seconds()),
            errbackArgs=(node, counts),
        )
        self.calls.append(call)

    def top_up(self) -> None:
        """Ask spares, in order, until R counting answers can come from replicas asked."""
        quorum, spares = self.quorum, self.spares
        self.asking += 1
        while spares and quorum.answered + self.potential < quorum.r:
            node, counts = spares.pop(0)
            self.ask(node, counts)
        self.asking -= 1
        self.landed()

    def hedge(self) -> None:
        """The hedge delay passed undecided: ask every spare."""
        self.timer = None
        if self.done.called:
            return
        c = self.coordinator
        c.hedges += 1
        until = c.clock.seconds() + SLOW_FOR
        for node in self.waiting:
            c._slow[node] = until
        spares, self.spares = self.spares, []
        self.ask_all(spares)

    def ok(self, record: Record | None, node: str, counts: bool, started: float) -> None:
        c = self.coordinator
        self.outstanding -= 1
        self.waiting.discard(node)
        if counts:
            self.potential -= 1
        c.latency.add(c.clock.seconds() - started)
        if c._slow:
            c._slow.pop(node, None)
        self.quorum.add(node, record, counts=counts)
        self.landed()

    def failed(self, failure: Failure, node: str, counts: bool) -> None:
        c = self.coordinator
        self.outstanding -= 1
        self.waiting.discard(node)
        if counts:
            self.potential -= 1
        c.health.call_failed(node, failure.value)
        if isinstance(failure.value, NodeBusy):
            self.busy.add(node)
        self.quorum.fail(node, _reply_kind(failure))
        self.top_up()

    def landed(self) -> None:
        """Answer once the quorum decides; repair once every replica asked has
        landed (not while a loop is still asking: answers may come at once)."""
        done = self.done
        if not done.called and self.quorum.outcome() is not None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            done.callback(None)
        if self.outstanding == 0 and done.called and not self.asking and not self.repaired:
            self.repaired = True
            self.coordinator._repair(self.key, self.quorum, self.epoch)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.spares = []
        for call in self.calls:
            call.cancel()


class Coordinator:
    def __init__(
        self,
        view: MapView | Ring,
        replica_client: ReplicaClient,
        health: HealthMonitor,
        versions: VersionClock,
        hints: HintKeeper,
        sizes: QuorumSizes | None = None,
        metrics: ProxyMetrics | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """``view``: the map to route by. A bare L{Ring} (tests, tools) is served as a
        provisional map of its nodes with ``sizes``; with a view, N, R and W are the
        map's and ``sizes`` is ignored. ``metrics``: where quorum outcomes, read
        repairs and epoch retries are counted (default: a private registry). ``clock``:
        what hedge delays are timed by (default: the replica client's)."""
        if isinstance(view, Ring):
            view = MapView.of_ring(view, sizes or DEFAULT_SIZES)
        self.view = view
        self.replica_client = replica_client
        self.health = health
        self.versions = versions
        self.hints = hints
        self.metrics = metrics if metrics is not None else ProxyMetrics.private()
        self._repairs = self.metrics.read_repairs
        self._epoch_retries = self.metrics.epoch_retries
        quorum = self.metrics.quorum
        self._quorum_ok = {False: quorum[("read", "ok")], True: quorum[("write", "ok")]}
        self.defaults = Consistency()
        """This proxy's own default R and W in place of the map's (None: the map's);
        a reload that changes ``--r`` or ``--w`` sets them."""
        self.clock: IReactorTime = replica_client.clock if clock is None else clock
        self.latency = LatencyWindow()
        """Recent replica read latencies: where the hedge delay comes from."""
        self.read_all_fraction = READ_ALL_FRACTION
        self._random = random.Random()
        self._slow: dict[str, float] = {}
        """Replicas that let a hedge fire, and until when they are asked last."""
        self.hedges = 0
        """Reads whose hedge fired (spares asked because the first R were slow)."""
        self.reads_of_all = 0
        """Reads that asked all N (the read-all share, or a move)."""

    @property
    def repairs(self) -> int:
        """Read repairs sent so far (``shardkv_read_repairs_total``)."""
        return int(counter_value(self._repairs))

    @property
    def epoch_retries(self) -> int:
        """Requests run again at a newer map (``shardkv_epoch_retries_total``)."""
        return int(counter_value(self._epoch_retries))

    @property
    def ring(self) -> Ring:
        """The ring reads use now (what ``/cluster`` and ``/explain`` show)."""
        return self.view.read_ring()

    @property
    def sizes(self) -> QuorumSizes:
        """The map's N, R and W."""
        return self.view.placement.sizes

    def quorum_sizes(self, c: Consistency, placement: Placement | None = None) -> QuorumSizes:
        """N, R and W for one request."""
        p = placement or self.view.placement
        sizes, d = p.sizes, self.defaults
        if d.r is not None or d.w is not None:
            sizes = QuorumSizes(sizes.n, d.r or sizes.r, d.w or sizes.w)
        return quorum_sizes(sizes, p.members, c)

    async def _at_epoch(self, run: Callable[[Placement], Awaitable[_T]], write: bool) -> _T:
        """``run`` at the current placement, and once more at a newer one if it
        failed, nothing was applied, and the map changed meanwhile; its quorum
        outcome counted (in this frame: one more coroutine per request would cost more)."""
        placement = self.view.placement
        try:
            retry = False
            try:
                result = await run(placement)
            except QuorumUnavailable as e:
                if write and e.details.get("outcome") != "not_applied":
                    raise
                if self.view.epoch == placement.epoch:
                    await self.view.settled()  # a newer map may be on its way in
                if self.view.epoch == placement.epoch:
                    raise
                retry = True
            if retry:
                self._epoch_retries.inc()
                result = await run(self.view.placement)
        except QuorumUnavailable as e:
            self.metrics.quorum_outcome(write, e)
            raise
        self._quorum_ok[write].inc()
        return result

    # reads

    async def read_record(
        self, key: str, n: int, r: int, placement: Placement | None = None
    ) -> Record | None:
        """The newest record (tombstones included) that R replicas agree exists.

        Hedged (see L{_Read}): R replicas are asked, the others only if one of
        them fails or is slow. A share of reads (L{read_all_fraction}), and
        every read while a move runs, asks all N.
        """
        p = placement or self.view.placement
        replicas = p.read_ring.preference_list(key, n)
        quorum = ReadQuorum(replicas, r)
        read = _Read(self, key, quorum, p.epoch)
        health = self.health
        # A replica with hints still waiting for it may be stale. A read
        # quorum that intersects every write quorum (R + W > N) outvotes it
        # anyway; a smaller one must not count it.
        intersects = r + min(p.map.w, n) > n
        up: list[tuple[str, bool]] = []
        for node in replicas:
            if health.is_down(node):
                quorum.fail(node)
            else:
                up.append((node, intersects or not health.has_hints_waiting(node)))
        # During a move (copying, handover) the nodes stream while they serve,
        # so latency varies most; asking all N then answers with the fastest R
        # without waiting for a hedge, and repairs every replica of the ranges
        # that are settling. Moves are rare, so this costs little.
        moving = len(p.write_rings) > 1
        if moving or self._random.random() < self.read_all_fraction:
            self.reads_of_all += 1
            read.ask_all(up)
        else:
            read.start(self._hedge_order(up))
        try:
            await read.done
        except CancelledError:
            # The client hung up: stop asking. (Writes, past this point, are
            # never cancelled, so replicas do not end up half-written.)
            read.cancel()
            raise
        if quorum.outcome() is Outcome.OK:
            return quorum.newest()
        raise self._read_error(quorum, r, read.busy)

    def _hedge_order(self, up: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
        """The order a hedged read asks ``up`` in: preference order, but
        replicas that count towards R first, and recently slow ones last."""
        slow = self._slow
        if slow:
            now = self.clock.seconds()
            for node, until in list(slow.items()):
                if until <= now:
                    del slow[node]
        if not slow and all(counts for _, counts in up):
            return up
        return sorted(up, key=lambda item: (not item[1], item[0] in slow))

    def hedge_delay(self) -> float:
        """Seconds a hedged read waits for its first R replicas before asking the
        others: the recent p99 of replica reads, within its floor and cap, and at
        most a quarter of the replica timeout (a hedge must come well before a 504)."""
        return min(self.latency.delay(), self.replica_client.timeout / 4)

    @staticmethod
    def _read_error(quorum: ReadQuorum, r: int, busy: set[str]) -> QuorumUnavailable:
        failed = sorted(quorum.failed)
        details = {"replied": quorum.answered, "required": r, "failed": failed}
        if failed and busy.issuperset(failed):
            return Overloaded(
                f"only {quorum.answered} of the {r} replicas needed could be read: "
                f"{', '.join(failed)} {'is' if len(failed) == 1 else 'are'} busy; "
                "try again shortly",
                **details,
            )
        down = f" ({', '.join(failed)} failed or down)" if failed else ""
        if any(kind is Reply.UNKNOWN for kind in quorum.failed.values()):
            message = f"only {quorum.answered} of the {r} replicas needed answered in time{down}"
            return QuorumTimeout(message, **details)
        message = f"only {quorum.answered} of the {r} replicas needed could be read{down}"
        return QuorumUnavailable(message, **details)

    def _repair(self, key: str, quorum: ReadQuorum, epoch: int) -> None:
        """Bring replicas that answered with an older record (or none) up to date."""
        newest = quorum.newest()
        if newest is None:
            return
        for node in quorum.stale():
            self._repairs.inc()
            call = self.replica_client.replica_put(node, key, newest, epoch=epoch)
            call.addErrback(self._repair_failed, node)

    def _repair_failed(self, failure: Failure, node: str) -> None:
        self.health.call_failed(node, failure.value)

    async def read(self, key: str, c: Consistency) -> Record | None:
        async def run(p: Placement) -> Record | None:
            n, r, _ = self.quorum_sizes(c, p)
            return await self.read_record(key, n, r, p)

        record = await self._at_epoch(run, write=False)
        return None if record is None or record.tombstone else record

    # writes

    async def write(
        self, key: str, value: bytes, content_type: str, pre: Precondition, c: Consistency
    ) -> WriteResult:
        async def run(p: Placement) -> WriteResult:
            n, r, w = self.quorum_sizes(c, p)
            current = await self._version_read(key, n, r, p)
            record, result = next_value(current, pre, self.versions, value, content_type)
            await self._replicate(key, record, n, w, c.sloppy, p)
            return result

        return await self._at_epoch(run, write=True)

    async def remove(self, key: str, pre: Precondition, c: Consistency) -> Version:
        async def run(p: Placement) -> Version:
            n, r, w = self.quorum_sizes(c, p)
            current = await self._version_read(key, n, r, p)
            record = next_tombstone(key, current, pre, self.versions)
            await self._replicate(key, record, n, w, c.sloppy, p)
            return record.version

        return await self._at_epoch(run, write=True)

    async def _version_read(self, key: str, n: int, r: int, p: Placement) -> Record | None:
        """A write's first step; if it fails, nothing was written."""
        try:
            return await self.read_record(key, n, r, p)
        except QuorumUnavailable as e:
            e.details["outcome"] = "not_applied"
            raise

    async def _replicate(
        self,
        key: str,
        record: Record,
        n: int,
        w: int,
        sloppy: bool,
        placement: Placement | None = None,
    ) -> None:
        """Send ``record`` to its replicas; once more, at the new placement, if
        nodes refused it for a stale epoch and the map changed meanwhile."""
        p = placement or self.view.placement
        stale: list[NodeHasNewerMap] = []
        try:
            await self._replicate_at(key, record, n, w, sloppy, p, stale)
        except QuorumUnavailable as first:
            if stale and self.view.epoch == p.epoch:
                await self.view.settled()
            now = self.view.placement
            if not stale or now.epoch == p.epoch:
                raise
            self._epoch_retries.inc()
            n2 = min(n, now.members)
            w2 = min(w, n2)
            try:
                await self._replicate_at(key, record, n2, w2, sloppy, now, [])
            except QuorumUnavailable as second:
                if first.details.get("outcome") != "not_applied":
                    second.details["outcome"] = "unknown"
                raise

    async def _replicate_at(
        self,
        key: str,
        record: Record,
        n: int,
        w: int,
        sloppy: bool,
        p: Placement,
        stale: list[NodeHasNewerMap],
    ) -> None:
        sets = p.write_sets(key, n)
        quorum: AnyWriteQuorum
        if len(sets) > 1 and any(set(s) != set(sets[0]) for s in sets[1:]):
            quorum = JointWriteQuorum(sets, w)
            targets = list(quorum.targets)
            current = p.write_rings[-1].preference_list(key, len(p.write_rings[-1].nodes))
            preference = current + [t.node for t in targets if t.node not in current]
            down = [t.node for t in targets if self.health.is_down(t.node)]
            for node in down:
                quorum.add(Target(node), Reply.FAILED)
            targets = [t for t in targets if t.node not in down]
        else:
            ring = p.write_rings[-1]
            preference = ring.preference_list(key, len(ring.nodes))
            targets = replica_targets(preference, n, self.health.is_down)
            quorum = WriteQuorum(targets, w, sloppy)
            down = [node for node in preference[:n] if self.health.is_down(node)]
        if not quorum.reachable():
            raise QuorumUnavailable(
                f"W={w} replicas are needed but {', '.join(down)} "
                f"{'is' if len(down) == 1 else 'are'} down; nothing was written",
                acks=0,
                required=w,
                outcome="not_applied",
                down=down,
            )
        self._admit(quorum, targets, w, write_cost(key, record))
        busy: set[Target] = set()
        decided, check = _first(lambda: quorum.outcome() is not None)

        def landed() -> None:
            check()
            if quorum.complete:
                self.hints.missed(key, record, quorum, preference, n)

        for target in targets:
            call = self.replica_client.replica_put(
                target.node, key, record, target.hint_for, epoch=p.epoch
            )
            call.addCallbacks(
                self._write_ok,
                self._write_failed,
                callbackArgs=(quorum, target, landed),
                errbackArgs=(quorum, target, landed, busy, stale),
            )
        check()
        await decided
        outcome = quorum.outcome()
        if outcome is Outcome.OK:
            return
        counts = {"acks": quorum.acks, "required": w}
        if outcome is Outcome.FAILED and busy and busy.issuperset(quorum.replies):
            raise Overloaded(
                f"only {quorum.acks} of the {w} replicas needed had room for the write; "
                "nothing was written, try again shortly",
                **counts,
                outcome="not_applied",
                busy=sorted({t.node for t in busy}),
            )
        if outcome is Outcome.FAILED:
            raise QuorumUnavailable(
                f"only {quorum.acks} of the {w} replicas needed acknowledged; "
                "the write was not applied",
                **counts,
                outcome="not_applied",
            )
        if any(reply is Reply.UNKNOWN for reply in quorum.replies.values()):
            raise QuorumTimeout(
                f"only {quorum.acks} of the {w} replicas needed acknowledged in time; "
                "the write may or may not have been applied",
                **counts,
                outcome="unknown",
            )
        raise QuorumUnavailable(
            f"only {quorum.acks} of the {w} replicas needed acknowledged; the write "
            "is on some replicas and may still become visible",
            **counts,
            outcome="unknown",
        )

    @staticmethod
    def _write_ok(_: bool, quorum: WriteQuorum, target: Target, landed: Any) -> None:
        quorum.add(target, Reply.OK)
        landed()

    def _admit(self, quorum: AnyWriteQuorum, targets: list[Target], w: int, size: int) -> None:
        """Refuse the write, before anything is sent, unless W targets have room for it."""
        need: dict[str, int] = {}
        busy: list[Target] = []
        for target in targets:
            need[target.node] = need.get(target.node, 0) + size
            if not self.replica_client.has_room(target.node, need[target.node]):
                busy.append(target)
        if not busy:
            return
        probe: AnyWriteQuorum
        if isinstance(quorum, JointWriteQuorum):
            probe = JointWriteQuorum(quorum.sets, w, dict(quorum.replies))
        else:
            probe = WriteQuorum(quorum.targets, w, quorum.sloppy, dict(quorum.replies))
        for target in busy:
            probe.add(target, Reply.FAILED)
        if probe.reachable():
            return
        nodes = sorted({t.node for t in busy})
        raise Overloaded(
            f"W={w} replicas are needed but {', '.join(nodes)} "
            f"{'has' if len(nodes) == 1 else 'have'} too much in flight; "
            "nothing was written, try again shortly",
            acks=0,
            required=w,
            outcome="not_applied",
            busy=nodes,
        )

    def _write_failed(
        self,
        failure: Failure,
        quorum: WriteQuorum,
        target: Target,
        landed: Any,
        busy: set[Target],
        stale: list[NodeHasNewerMap],
    ) -> None:
        self.health.call_failed(target.node, failure.value)
        if isinstance(failure.value, NodeBusy):
            busy.add(target)
        if isinstance(failure.value, NodeHasNewerMap):
            stale.append(failure.value)
        quorum.add(target, _reply_kind(failure))
        landed()
