"""The coordinator: runs each client request as quorum calls to the replicas.

A key lives on the first N distinct nodes of its preference list. A read is
hedged (L{_Read}): it asks the first R healthy replicas and answers once R have
replied, with the newest version seen; it asks the others only when one of
those fails or has not answered within the hedge delay, and one read in ten
(L{READ_ALL_FRACTION}), like every read while a move runs, asks all N. The
replicas it asked that were stale are repaired in the background.

A write sends its record to the N replicas in parallel and answers once W have
durably acknowledged it. Its version must be larger than any acknowledged
before it started. Where any two write quorums intersect (2W > N) and the
write has no precondition, it mints a tentative version and sends it at once
(L{Coordinator._write_one_round}: one round, retried past a refusal);
otherwise it first reads the newest version (R replies) and mints past it.
Neither waits for the slowest replica.

When a quorum cannot be had it raises:

- L{QuorumUnavailable}: W (or R) cannot be reached; the details say how many
  replicas acknowledged, and whether the write may still have been applied
  on some of them (``"outcome": "unknown"``) or not at all;
- L{QuorumTimeout}: the quorum was still possible but replicas did not
  answer in time; for a write the outcome is unknown, never a failure;
- L{Overloaded}: the quorum failed only because replicas were busy (each had
  its window of bytes in flight full, L{NodeBusy}), so nothing was sent
  anywhere and a retry shortly after may succeed. A write checks every
  target for room before it sends anything. If fewer than W have room in
  their windows (L{shardkv.core.window}: a node that answers slowly gets a
  smaller one) but W would under their caps, it waits for room, oldest
  first, for at most three quarters of the timeout (L{ROOM_WAIT_FRACTION}).
  If W cannot have room, or the wait ends, it is refused whole, rather than
  sent to one replica and then reported as "unknown". An outcome that may
  have been applied is never "overloaded".

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
from typing import TypeVar

from twisted.internet.defer import Deferred
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
from shardkv.core.versions import SeenCounters, Version, VersionClock
from shardkv.core.window import Room
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
from shardkv.replica import codec
from shardkv.replica.client import Cancellable, ReplicaClient, write_cost

DEFAULT_SIZES = QuorumSizes(n=3, r=2, w=2)

_T = TypeVar("_T")


def _reply_kind(error: BaseException) -> Reply:
    """May the failed call have been applied? Only if it was sent and not answered."""
    if isinstance(error, ReplicaCallFailed) and error.sent:
        return Reply.UNKNOWN
    return Reply.FAILED


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
        # Cancelled (the client hung up): stop asking. (Writes, once sent,
        # are never cancelled, so replicas do not end up half-written.)
        self.done: Deferred[None] = Deferred(self._cancelled)
        self.busy: set[str] = set()
        self.calls: list[Cancellable] = []
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
        tag = (node, counts, c.clock.seconds())
        self.calls.append(
            c.replica_client.get_into(node, self.key, self.epoch, self.ok, self.failed, tag)
        )

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
        c._hedges.inc()
        until = c.clock.seconds() + SLOW_FOR
        for node in self.waiting:
            c._slow[node] = until
        spares, self.spares = self.spares, []
        self.ask_all(spares)

    def ok(self, record: Record | None, tag: tuple[str, bool, float]) -> None:
        node, counts, started = tag
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

    def failed(self, error: BaseException, tag: tuple[str, bool, float]) -> None:
        node, counts, _ = tag
        c = self.coordinator
        self.outstanding -= 1
        self.waiting.discard(node)
        if counts:
            self.potential -= 1
        c.health.call_failed(node, error)
        if isinstance(error, NodeBusy):
            self.busy.add(node)
        self.quorum.fail(node, _reply_kind(error))
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

    def _cancelled(self, _: Deferred[None]) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.spares = []
        for call in self.calls:
            call.cancel()


ONE_ROUND_ATTEMPTS = 3
"""Tentative versions a one-round write sends before it falls back to reading
the version first. A refusal carries the newest version its replica holds, so
the second try wins unless another writer wrote the key in the meantime; the
third covers one such race. Two writers racing on one key could otherwise
leapfrog each other; the read-first fallback always ends (there a replica that
holds a newer version acknowledges: the write lost to a concurrent one)."""


def _unconditional(pre: Precondition) -> bool:
    return not (pre.if_match or pre.match_any or pre.none_match_any or pre.other_tags)


class _Tentative:
    """What the tries of one one-round write learned from the replicas' answers."""

    __slots__ = ("blind", "maybe_applied", "minted", "newest", "refused")

    def __init__(self) -> None:
        self.minted: set[Version] = set()
        """The versions this write's tries carried (never "someone else's")."""
        self.refused: Version | None = None
        """The newest version a replica refused the current try with."""
        self.newest: tuple[Version, bool] | None = None
        """The newest record any answer reported held, not one of ours, and
        whether it was live: what ``created`` is decided by."""
        self.maybe_applied = False
        """A try that did not reach W may be on some replicas."""
        self.blind = False
        """A replica refused without saying what it holds (a node older than
        the field, or a record gone meanwhile): minting past it is guesswork."""

    def reply(self, result: codec.Result, version: Version) -> Reply:
        """A home replica's answer to a try of ``version``, as the quorum counts it."""
        if result.live is None:
            self.blind = self.blind or not result.applied
            return Reply.OK if result.applied else Reply.FAILED
        held = result.held
        if held == version:  # it holds this very try already
            return Reply.OK
        if held is not None:
            self.note(held, result.live)
        if result.applied:
            return Reply.OK
        if held is None:
            self.blind = True
        elif self.refused is None or held > self.refused:
            self.refused = held
        return Reply.FAILED

    def note(self, held: Version, live: bool) -> None:
        if held in self.minted:
            return
        if self.newest is None or held > self.newest[0]:
            self.newest = (held, live)

    def created(self) -> bool:
        return self.newest is None or not self.newest[1]

    def honest(self, e: QuorumUnavailable) -> QuorumUnavailable:
        """``e``, unless an earlier try may be on some replicas: then its outcome
        is unknown (never not_applied, nor overloaded)."""
        if not self.maybe_applied or e.details.get("outcome") == "unknown":
            return e
        details = {**e.details, "outcome": "unknown"}
        first = e.message.split(";")[0]
        message = (
            f"{first}; an earlier try of this write is on some replicas "
            "and may still become visible"
        )
        if isinstance(e, QuorumTimeout):
            return QuorumTimeout(message, **details)
        return QuorumUnavailable(message, **details)


class _Write:
    """One replica write in flight: its quorum, and what happens as answers land.

    Hints (L{HintKeeper.missed}) go out once every target answered, and only for
    a write that stands: a one-round try that was superseded by a newer try
    needs none, and one whose outcome is not known yet waits for ``stands``.
    """

    __slots__ = (
        "busy",
        "coordinator",
        "done",
        "hinted",
        "key",
        "n",
        "preference",
        "quorum",
        "record",
        "refusals",
        "ring",
        "sending",
        "stale",
        "tally",
        "verdict",
    )

    def __init__(
        self,
        coordinator: Coordinator,
        key: str,
        record: Record,
        quorum: AnyWriteQuorum,
        ring: Ring,
        preference: list[str] | None,
        n: int,
        stale: list[NodeHasNewerMap],
        tally: _Tentative | None,
    ) -> None:
        self.coordinator = coordinator
        self.key = key
        self.record = record
        self.quorum = quorum
        self.ring = ring
        self.preference = preference
        """The key's whole preference list, once known (it is needed only when a
        replica is down or missed the write)."""
        self.n = n
        self.stale = stale
        self.tally = tally
        self.busy: set[Target] = set()
        self.refusals: list[Target] = []
        self.done: Deferred[None] = Deferred()
        self.sending = True
        self.hinted = False
        self.verdict: bool | None = True if tally is None else None

    def ok(self, result: codec.Result, target: Target) -> None:
        reply = Reply.OK
        if self.tally is not None and target.hint_for is None:
            reply = self.tally.reply(result, self.record.version)
            if reply is Reply.FAILED:
                self.refusals.append(target)
        self.quorum.add(target, reply)
        self.landed()

    def failed(self, error: BaseException, target: Target) -> None:
        c = self.coordinator
        c.health.call_failed(target.node, error)
        if isinstance(error, NodeBusy):
            self.busy.add(target)
        if isinstance(error, NodeHasNewerMap):
            self.stale.append(error)
        self.quorum.add(target, _reply_kind(error))
        self.landed()

    def stands(self, final: bool) -> None:
        """Say whether this write is the one that counts (a one-round try)."""
        self.verdict = final
        self.landed()

    def landed(self) -> None:
        if self.sending:
            return
        quorum = self.quorum
        if not self.done.called and quorum.outcome() is not None:
            self.done.callback(None)
        if self.verdict and not self.hinted and quorum.complete:
            self.hinted = True
            if all(reply is Reply.OK for reply in quorum.replies.values()):
                return  # nobody missed it (the common case): no hints
            preference = self.preference
            if preference is None:
                preference = self.ring.preference_list(self.key, len(self.ring.nodes))
            # A replica that refused this write holds a newer version: it
            # needs no hint of this one.
            self.coordinator.hints.missed(
                self.key, self.record, quorum, preference, self.n, self.refusals
            )


ROOM_WAIT_FRACTION = 0.75
"""The part of the timeout a write may wait for W of its replicas to have room."""
MAX_WAITING = 256
"""Writes that may wait for room at once; past it a write is refused at once."""


class _Pending:
    """A write waiting for room: what it will send, and the timer that gives up."""

    __slots__ = ("epoch", "size", "targets", "timer", "w", "write")

    def __init__(self, write: _Write, targets: list[Target], w: int, size: int, epoch: int) -> None:
        self.write = write
        self.targets = targets
        self.w = w
        self.size = size
        self.epoch = epoch
        self.timer: IDelayedCall | None = None


def _overloaded(w: int, nodes: list[str], why: str) -> Overloaded:
    """The refusal of a write that ``nodes`` had no room for; ``why`` follows their names."""
    return Overloaded(
        f"W={w} replicas are needed but {', '.join(nodes)} {why}; "
        "nothing was written, try again shortly",
        acks=0,
        required=w,
        outcome="not_applied",
        busy=nodes,
    )


def _too_much(nodes: list[str]) -> str:
    return f"{'has' if len(nodes) == 1 else 'have'} too much in flight"


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
        self.seen = SeenCounters()
        """The newest version counter seen per key: one-round writes mint past it."""
        self.one_round = True
        """Whether writes that may (L{_in_one_round}) skip the version read."""
        self._hedges = self.metrics.read_hedges
        self._reads_of_all = self.metrics.reads_of_all
        self._one_round_retries = self.metrics.one_round_retries
        self._one_round_fallbacks = self.metrics.one_round_fallbacks
        self._waiting: list[_Pending] = []
        """Writes waiting for room (L{_wait_for_room}), oldest first."""
        self._admitting = False
        self._freed_again = False
        replica_client.room_freed = self._room_freed

    @property
    def repairs(self) -> int:
        """Read repairs sent so far (``shardkv_read_repairs_total``)."""
        return int(counter_value(self._repairs))

    @property
    def hedges(self) -> int:
        """Reads whose hedge fired (``shardkv_read_hedges_total``)."""
        return int(counter_value(self._hedges))

    @property
    def reads_of_all(self) -> int:
        """Reads that asked all N (``shardkv_reads_of_all_total``)."""
        return int(counter_value(self._reads_of_all))

    @property
    def one_round_retries(self) -> int:
        """One-round tries sent again past a refusal (``shardkv_one_round_retries_total``)."""
        return int(counter_value(self._one_round_retries))

    @property
    def one_round_fallbacks(self) -> int:
        """One-round writes that read first in the end (``shardkv_one_round_fallbacks_total``)."""
        return int(counter_value(self._one_round_fallbacks))

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
        return await self._start_read(key, n, r, placement or self.view.placement)

    def _start_read(self, key: str, n: int, r: int, p: Placement) -> Deferred[Record | None]:
        """L{read_record} as a Deferred (one coroutine fewer on the hottest path);
        cancelling it stops asking (the client hung up)."""
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
            self._reads_of_all.inc()
            read.ask_all(up)
        else:
            read.start(self._hedge_order(up))
        return read.done.addCallback(self._read_answer, read)

    def _read_answer(self, _: None, read: _Read) -> Record | None:
        quorum = read.quorum
        if quorum.outcome() is Outcome.OK:
            newest = quorum.newest()
            if newest is not None:
                self.seen.saw(read.key, newest.version)
            return newest
        raise self._read_error(quorum, quorum.r, read.busy)

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
        """A client's read: the newest live record, or None.

        L{_at_epoch}'s rule for reads, written out here: one coroutine per
        read, where the general form costs three."""
        p = self.view.placement
        try:
            try:
                n, r, _ = self.quorum_sizes(c, p)
                record = await self._start_read(key, n, r, p)
            except QuorumUnavailable:
                if self.view.epoch == p.epoch:
                    await self.view.settled()  # a newer map may be on its way in
                if self.view.epoch == p.epoch:
                    raise
                self._epoch_retries.inc()
                p = self.view.placement
                n, r, _ = self.quorum_sizes(c, p)
                record = await self._start_read(key, n, r, p)
        except QuorumUnavailable as e:
            self.metrics.quorum_outcome(False, e)
            raise
        self._quorum_ok[False].inc()
        return None if record is None or record.tombstone else record

    # writes

    async def write(
        self, key: str, value: bytes, content_type: str, pre: Precondition, c: Consistency
    ) -> WriteResult:
        async def run(p: Placement) -> WriteResult:
            n, r, w = self.quorum_sizes(c, p)
            if self._in_one_round(key, pre, c, n, w, p):
                return await self._write_one_round(key, value, content_type, c, n, w, p)
            current = await self._version_read(key, n, r, p)
            record, result = next_value(current, pre, self.versions, value, content_type)
            await self._replicate(key, record, n, w, c.sloppy, p)
            self.seen.saw(key, record.version)
            return result

        return await self._at_epoch(run, write=True)

    async def remove(self, key: str, pre: Precondition, c: Consistency) -> Version:
        async def run(p: Placement) -> Version:
            n, r, w = self.quorum_sizes(c, p)
            current = await self._version_read(key, n, r, p)
            record = next_tombstone(key, current, pre, self.versions)
            await self._replicate(key, record, n, w, c.sloppy, p)
            self.seen.saw(key, record.version)
            return record.version

        return await self._at_epoch(run, write=True)

    def _in_one_round(
        self, key: str, pre: Precondition, c: Consistency, n: int, w: int, p: Placement
    ) -> bool:
        """May this write skip the version read (see L{_write_one_round})?

        Only when any two write quorums of its key intersect (2W > N, and a
        hinted copy does not count: not ``sloppy``), it has no precondition
        (If-Match and If-None-Match are checked against what the read finds),
        and its key is not moving: while a move writes to two replica sets
        (W in each), two writes' quorums need not share a replica of either set
        at the boundary of two epochs, and the read-first path is what the
        membership argument covers. A write that names its R (``?r=``) reads
        with it, as it always did. (Deletes always read: a delete of a missing
        key answers 404.)
        """
        if not self.one_round or c.sloppy or c.r is not None or 2 * w <= n:
            return False
        if not _unconditional(pre):
            return False
        if len(p.write_rings) == 1:
            return True
        first, *others = p.write_sets(key, n)
        return all(set(s) == set(first) for s in others)

    async def _write_one_round(
        self,
        key: str,
        value: bytes,
        content_type: str,
        c: Consistency,
        n: int,
        w: int,
        p: Placement,
    ) -> WriteResult:
        """A write that sends a tentative version at once instead of reading first.

        The version is one past the newest this proxy saw for the key
        (L{SeenVersions}; counter 1 if it saw none). Each replica applies it
        only if it is newer than what it holds, and says what it held. The
        write is acknowledged once W replicas applied it. If fewer did and some
        refused with a newer version, it is sent again to all, one past the
        newest refusal, at most L{ONE_ROUND_ATTEMPTS} times in all; then (or if
        the map changed, or a node could not say what it held) it falls back
        to reading the version first.

        Why a write that starts after an acknowledged one still gets a larger
        version: the two writes' quorums are W of the key's N replicas each,
        so with 2W > N they share a replica. That replica holds the
        acknowledged version (versions on a replica never go back) and refuses
        a smaller one, so this write cannot reach W with a smaller version. A
        losing try that a few replicas applied carries this write's own value
        and is overwritten by its next try (or the fallback), with a larger
        version; until then no quorum read returns it, since every read
        quorum meets the acknowledged write's. Because a try may be on some
        replicas, a failure after it is reported "unknown", never "not_applied".

        ``created`` (201): no record was live before this write. Every
        replica's answer says what it held before it; by the same intersection
        one of the acknowledging replicas held the newest acknowledged write
        (or something newer), so the newest record any answer reports
        (refusals included, this write's own tries excluded) says whether the
        key existed, as the read-first path's newest record does.
        """
        tally = _Tentative()
        version = self.versions.mint_after(self.seen.get(key))
        stale: list[NodeHasNewerMap] = []
        try:
            for attempt in range(ONE_ROUND_ATTEMPTS):
                record = Record(version, value, content_type)
                tally.minted.add(version)
                write = self._start_write(key, record, n, w, False, p, stale, tally)
                await write.done
                if write.quorum.outcome() is Outcome.OK:
                    write.stands(True)
                    self.seen.saw(key, version)
                    return WriteResult(version, created=tally.created())
                refused, tally.refused = tally.refused, None
                if write.quorum.outcome() is Outcome.UNKNOWN:
                    tally.maybe_applied = True
                done_trying = refused is None and not stale and not tally.blind
                if done_trying or (stale and not tally.maybe_applied):
                    # Failed as any write fails (no replica holds a newer
                    # version), or refused for its epoch and applied nowhere:
                    # then L{_at_epoch} runs it again at the new map.
                    write.stands(True)
                    raise self._write_error(write, w)
                write.stands(False)
                if refused is None or stale or tally.blind:
                    break
                self.seen.saw(key, refused)
                if attempt + 1 < ONE_ROUND_ATTEMPTS:
                    self._one_round_retries.inc()
                    version = self.versions.mint(refused)
            self._one_round_fallbacks.inc()
            if stale:  # and a try may be on some replicas: read, then write, at the new map
                if self.view.epoch == p.epoch:
                    await self.view.settled()
                if self.view.epoch != p.epoch:
                    self._epoch_retries.inc()
                p = self.view.placement
                n, r, w = self.quorum_sizes(c, p)
            else:
                r = self.quorum_sizes(c, p).r
            current = await self._version_read(key, n, r, p)
            if current is not None and current.version not in tally.minted:
                tally.note(current.version, not current.tombstone)
            record, _ = next_value(current, Precondition(), self.versions, value, content_type)
            await self._replicate(key, record, n, w, False, p)
        except QuorumUnavailable as e:
            raise tally.honest(e) from None
        self.seen.saw(key, record.version)
        return WriteResult(record.version, created=tally.created())

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
        write = self._start_write(key, record, n, w, sloppy, p, stale)
        await write.done
        if write.quorum.outcome() is not Outcome.OK:
            raise self._write_error(write, w)

    def _start_write(
        self,
        key: str,
        record: Record,
        n: int,
        w: int,
        sloppy: bool,
        p: Placement,
        stale: list[NodeHasNewerMap],
        tally: _Tentative | None = None,
    ) -> _Write:
        """Send ``record`` to its targets; ``done`` on the write fires once its
        quorum decided. (Not a coroutine: the caller awaits ``done``, one
        coroutine fewer per write.)

        Raises before sending anything when W cannot be had (too many targets
        down, or busy: L{_admit}). With a ``tally`` (a one-round write) a
        replica's refusal is not an acknowledgement, and the answers feed it.
        """
        quorum: AnyWriteQuorum
        ring = p.write_rings[-1]
        sets = p.write_sets(key, n) if len(p.write_rings) > 1 else None
        preference: list[str] | None = None
        if sets is not None and any(set(s) != set(sets[0]) for s in sets[1:]):
            quorum = JointWriteQuorum(sets, w)
            targets = list(quorum.targets)
            current = ring.preference_list(key, len(ring.nodes))
            preference = current + [t.node for t in targets if t.node not in current]
            down = [t.node for t in targets if self.health.is_down(t.node)]
            for node in down:
                quorum.add(Target(node), Reply.FAILED)
            targets = [t for t in targets if t.node not in down]
        else:
            # The whole preference list only when a home replica is down (its
            # stand-in comes from further along) or, later, for hints.
            is_down = self.health.is_down
            home = ring.preference_list(key, n)
            down = [node for node in home if is_down(node)]
            if down:
                preference = ring.preference_list(key, len(ring.nodes))
                targets = replica_targets(preference, n, is_down)
            else:
                targets = [Target(node) for node in home]
            quorum = WriteQuorum(targets, w, sloppy)
        if not quorum.reachable():
            raise QuorumUnavailable(
                f"W={w} replicas are needed but {', '.join(down)} "
                f"{'is' if len(down) == 1 else 'are'} down; nothing was written",
                acks=0,
                required=w,
                outcome="not_applied",
                down=down,
            )
        size = write_cost(key, record)
        now = self._admit(quorum, targets, w, size)
        write = _Write(self, key, record, quorum, ring, preference, n, stale, tally)
        if now:
            self._send(write, targets, p.epoch)
        else:
            self._wait_for_room(_Pending(write, targets, w, size, p.epoch))
        return write

    def _send(self, write: _Write, targets: list[Target], epoch: int) -> None:
        put = self.replica_client.write_into
        key, record = write.key, write.record
        for target in targets:
            put(target.node, key, record, target.hint_for, epoch, write.ok, write.failed, target)
        write.sending = False
        write.landed()

    def _wait_for_room(self, pending: _Pending) -> None:
        """Hold a write until W of its targets have room, for at most
        L{ROOM_WAIT_FRACTION} of the timeout; then refuse it, nothing sent."""
        if len(self._waiting) >= MAX_WAITING:
            raise self._refusal(pending, None)
        seconds = self.replica_client.timeout * ROOM_WAIT_FRACTION
        pending.timer = self.clock.callLater(seconds, self._gave_up, pending, seconds)
        self._waiting.append(pending)

    def _gave_up(self, pending: _Pending, seconds: float) -> None:
        self._waiting.remove(pending)
        done = pending.write.done
        if not done.called:
            done.errback(self._refusal(pending, f"had no room within {seconds:g} s"))

    def _room_freed(self) -> None:
        """Send every waiting write that now finds room, oldest first."""
        if not self._waiting:
            return
        if self._admitting:
            self._freed_again = True
            return
        self._admitting = True
        try:
            self._freed_again = True
            while self._freed_again:
                self._freed_again = False
                for pending in list(self._waiting):
                    write = pending.write
                    if write.done.called:  # its caller gave up
                        self._forget(pending)
                    elif self._fits(pending.targets, pending.w, pending.size, write.quorum)[0]:
                        self._forget(pending)
                        self._send(write, pending.targets, pending.epoch)
        finally:
            self._admitting = False

    def _forget(self, pending: _Pending) -> None:
        self._waiting.remove(pending)
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()

    def _refusal(self, pending: _Pending, why: str | None) -> Overloaded:
        """Why ``pending`` is refused (``why``; None: they have too much in flight)."""
        _, busy = self._fits(pending.targets, pending.w, pending.size, pending.write.quorum)
        nodes = sorted({t.node for t in busy})
        return _overloaded(pending.w, nodes, why or _too_much(nodes))

    @staticmethod
    def _write_error(write: _Write, w: int) -> QuorumUnavailable:
        """Why ``write`` (decided, not OK) failed, and whether it may have been applied."""
        quorum, busy = write.quorum, write.busy
        outcome = quorum.outcome()
        counts = {"acks": quorum.acks, "required": w}
        if outcome is Outcome.FAILED and busy and busy.issuperset(quorum.replies):
            return Overloaded(
                f"only {quorum.acks} of the {w} replicas needed had room for the write; "
                "nothing was written, try again shortly",
                **counts,
                outcome="not_applied",
                busy=sorted({t.node for t in busy}),
            )
        if outcome is Outcome.FAILED:
            return QuorumUnavailable(
                f"only {quorum.acks} of the {w} replicas needed acknowledged; "
                "the write was not applied",
                **counts,
                outcome="not_applied",
            )
        if any(reply is Reply.UNKNOWN for reply in quorum.replies.values()):
            return QuorumTimeout(
                f"only {quorum.acks} of the {w} replicas needed acknowledged in time; "
                "the write may or may not have been applied",
                **counts,
                outcome="unknown",
            )
        return QuorumUnavailable(
            f"only {quorum.acks} of the {w} replicas needed acknowledged; the write "
            "is on some replicas and may still become visible",
            **counts,
            outcome="unknown",
        )

    def _admit(self, quorum: AnyWriteQuorum, targets: list[Target], w: int, size: int) -> bool:
        """Whether the write may be sent now (W of its targets have room in their
        windows) or must wait for room (W would have room under their caps);
        raises L{Overloaded}, before anything is sent, if neither."""
        fits, busy = self._fits(targets, w, size, quorum)
        if fits:
            return True
        _, full = self._fits(targets, w, size, quorum, under_cap=True)
        if self._reachable(quorum, w, full):
            return False
        nodes = sorted({t.node for t in busy})
        raise _overloaded(w, nodes, _too_much(nodes))

    def _fits(
        self,
        targets: list[Target],
        w: int,
        size: int,
        quorum: AnyWriteQuorum,
        under_cap: bool = False,
    ) -> tuple[bool, list[Target]]:
        """Whether W of ``targets`` have room for ``size`` bytes (in their
        windows, or ``under_cap``), and the targets that have none."""
        room_for = self.replica_client.room_for
        need: dict[str, int] = {}
        busy: list[Target] = []
        for target in targets:
            need[target.node] = need.get(target.node, 0) + size
            room = room_for(target.node, need[target.node])
            if room is not Room.FREE and not (under_cap and room is Room.WINDOW_FULL):
                busy.append(target)
        if not busy:
            return True, busy
        return self._reachable(quorum, w, busy), busy

    @staticmethod
    def _reachable(quorum: AnyWriteQuorum, w: int, without: list[Target]) -> bool:
        """Could ``quorum`` still reach W if every target in ``without`` failed?"""
        probe: AnyWriteQuorum
        if isinstance(quorum, JointWriteQuorum):
            probe = JointWriteQuorum(quorum.sets, w, dict(quorum.replies))
        else:
            probe = WriteQuorum(quorum.targets, w, quorum.sloppy, dict(quorum.replies))
        for target in without:
            probe.add(target, Reply.FAILED)
        return probe.reachable()
