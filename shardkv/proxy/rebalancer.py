"""The move's orchestrator: takes a committed change through its phases to idle.

Every proxy runs one, every 0.5 s. Nothing here is state of the cluster:
each step reads the map from the nodes, decides from what the nodes report,
and moves the map on by one compare-and-set, so racing proxies are safe (one
wins, the others see the new epoch on their next step) and a proxy killed
mid-move loses nothing (any other proxy, or this one restarted, carries on).

One step, for a map with a move:

1. **Barrier** (rule 2 of the design): every member (state != removed, the
   leaving ones included) has learned the current epoch. Until then nothing
   advances and the state is ``waiting``, naming who is behind or unreachable.
2. ``copying``: every node of the previous ring reports its stream ``done``
   for this epoch (a move with ``copy: false``, an abort from handover, has
   nothing to copy and advances at once). ``handover``: advance. ``cleanup``:
   every member reports its cleanup ``done`` for this epoch.
3. Advance: L{next_phase}, proposed as "from this epoch", so only one of
   several racing proxies installs it. Losing is not an error.

The progress (``GET /admin/rebalance``, ``/cluster``, and the log about every
5 s and at each phase change) comes from the last step's node reports.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shardkv.core.clustermap import ClusterMap, MemberState, Phase
from shardkv.core.membership import next_phase
from shardkv.errors import MapConflict, MapUnavailable, ReplicaCallFailed
from shardkv.periodic import periodic
from shardkv.proxy.changes import Proposer, Sync, View, call_all, cas_to
from shardkv.replica.protocol import FENCE_GRACE

log = Logger(namespace="shardkv.rebalance")

STEP_INTERVAL = 0.5
LOG_INTERVAL = 5.0
RATE_WINDOW = 10.0
"""Seconds of samples the keys/s figure is taken over."""


class MoveNodes(Protocol):
    async def move_status(self, node: str) -> dict[str, Any]: ...


def _members(m: ClusterMap) -> list[str]:
    """Who must keep up with a move: every member not removed, the leaving ones too."""
    leaving = {x.id for x in m.members if x.state == MemberState.LEAVING}
    return sorted(set(m.acceptors()) | leaving)


class Rebalancer:
    """Runs the move in the map, one compare-and-set per phase."""

    def __init__(
        self,
        view: View,
        sync: Sync,
        proposer: Proposer,
        nodes: MoveNodes,
        clock: IReactorTime,
        interval: float = STEP_INTERVAL,
        log_interval: float = LOG_INTERVAL,
    ) -> None:
        self.view = view
        self.sync = sync
        self.proposer = proposer
        self.nodes = nodes
        self.clock = clock
        self.interval = interval
        self.log_interval = log_interval
        self.epoch: int | None = None
        """The epoch the reports below are for."""
        self.waiting_for: list[str] = []
        self.reports: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self.samples: deque[tuple[float, int]] = deque()
        self._logged: tuple[int, str] | None = None
        self._last_log = float("-inf")

    def service(self) -> Service:
        """Run L{step} every ``interval`` seconds."""
        return periodic(self.interval, self.step, self.clock)

    async def step(self) -> None:
        """One look at the move, and at most one phase further."""
        if self.view.current.move is None and self.epoch is None:
            return  # idle: nothing to ask the nodes (the map is polled elsewhere)
        try:
            m = await self.sync.refresh()
        except MapUnavailable as e:
            self._wait(self.view.current, [], str(e))
            return
        if m.move is None:
            self._reset(None)
            self._log(m)
            return
        if self.epoch != m.epoch:
            self._reset(m.epoch)
        learned = self.sync.learned_epochs()
        behind = [n for n in _members(m) if (learned.get(n) or 0) < m.epoch]
        if behind:
            self._wait(m, behind, "has not learned the epoch")
            return
        if self.sync.agreed_for(m.epoch) < FENCE_GRACE:
            return  # nodes may still take calls of the epoch before (the fence's grace)
        if await self._ready(m):
            await self._advance(m)
        self._log(self.view.current)

    async def _ready(self, m: ClusterMap) -> bool:
        """Has every node done its part of this phase?"""
        move = m.move
        assert move is not None
        if move.phase == Phase.HANDOVER or (move.phase == Phase.COPYING and not move.copy):
            self.waiting_for = []
            return True
        if move.phase == Phase.COPYING:
            nodes, part = sorted(m.previous_weights()), "stream"
        else:
            nodes, part = _members(m), "cleanup"
        answers, failures = await call_all(nodes, self.nodes.move_status)
        if self.epoch != m.epoch:
            return False  # the map moved on while we asked
        self.reports.update(answers)
        self.errors = {n: str(e) for n, e in failures.items()}
        for n in answers:
            self.errors.pop(n, None)
        self.waiting_for = sorted(failures)
        if move.phase == Phase.COPYING:
            self._sample()
        if failures:
            return False
        return all(
            a.get("epoch") == m.epoch and (a.get(part) or {}).get("state") == "done"
            for a in answers.values()
        )

    async def _advance(self, m: ClusterMap) -> None:
        wanted = next_phase(m)
        try:
            installed = await self.proposer.propose(cas_to(m.epoch, wanted), m.acceptors())
        except MapConflict:
            return  # another proxy advanced it first; the next step sees its map
        except (MapUnavailable, ReplicaCallFailed) as e:
            self._wait(m, [], str(e))
            return
        self.view.install(installed)
        self._reset(installed.epoch if installed.move is not None else None)

    def _reset(self, epoch: int | None) -> None:
        self.epoch = epoch
        self.reports = {}
        self.errors = {}
        self.waiting_for = []
        self.samples.clear()

    def _wait(self, m: ClusterMap, nodes: Sequence[str], reason: str) -> None:
        if m.move is not None and self.epoch != m.epoch:
            self._reset(m.epoch)
        self.waiting_for = sorted(nodes)
        for n in nodes:
            self.errors.setdefault(n, reason)
        if not nodes:
            self.errors["map"] = reason
        self._log(m)

    # -- progress -------------------------------------------------------------------

    def _moved(self) -> tuple[int, int]:
        """Keys and bytes the primary sources have sent at this epoch."""
        keys = bytes_ = 0
        for report in self.reports.values():
            if report.get("epoch") != self.epoch:
                continue
            stream = report.get("stream") or {}
            keys += int(stream.get("keys_moved", 0))
            bytes_ += int(stream.get("bytes_moved", 0))
        return keys, bytes_

    def _sample(self) -> None:
        now = self.clock.seconds()
        self.samples.append((now, self._moved()[0]))
        while len(self.samples) > 2 and self.samples[0][0] < now - RATE_WINDOW:
            self.samples.popleft()

    def keys_per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, k0), (t1, k1) = self.samples[0], self.samples[-1]
        if t1 <= t0:
            return None
        return max(0.0, (k1 - k0) / (t1 - t0))

    def status(self) -> dict[str, Any]:
        """``GET /admin/rebalance``: where the move is, for the map this proxy serves."""
        m = self.view.current
        move = m.move
        if move is None:
            return {
                "state": "idle",
                "phase": None,
                "epoch": m.epoch,
                "aborted": False,
                "keys_moved": 0,
                "keys_total": 0,
                "bytes_moved": 0,
                "bytes_total": 0,
                "keys_per_s": None,
                "eta_s": 0,
                "waiting_for": [],
                "transfers": [],
                "error": None,
            }
        current = self.epoch == m.epoch
        if move.phase == Phase.COPYING:
            keys_moved, bytes_moved = self._moved() if current else (0, 0)
            rate = self.keys_per_s() if current else None
        else:
            # The copy is over: every key that had to move has.
            keys_moved, bytes_moved, rate = move.keys_total, move.bytes_total, None
        remaining = max(0, move.keys_total - keys_moved)
        eta: float | None
        if move.phase != Phase.COPYING or remaining == 0:
            eta = 0
        elif rate:
            eta = round(remaining / rate, 1)
        else:
            eta = None
        waiting = list(self.waiting_for) if current else []
        part = "stream" if move.phase == Phase.COPYING else "cleanup"
        transfers = []
        if current:
            for node in sorted(set(self.reports) | (set(self.errors) - {"map"})):
                report = self.reports.get(node, {})
                stream = report.get("stream") or {}
                state = (report.get(part) or {}).get("state", "unknown")
                transfers.append(
                    {
                        "node": node,
                        "state": "unreachable" if node in self.waiting_for else state,
                        "keys_moved": int(stream.get("keys_moved", 0)),
                        "bytes_moved": int(stream.get("bytes_moved", 0)),
                        "keys_deleted": int((report.get("cleanup") or {}).get("keys_deleted", 0)),
                        "last_error": self.errors.get(node, stream.get("last_error")),
                    }
                )
        return {
            "state": "waiting" if waiting else str(move.phase),
            "phase": str(move.phase),
            "epoch": m.epoch,
            "aborted": move.aborted,
            "keys_moved": keys_moved,
            "keys_total": move.keys_total,
            "bytes_moved": bytes_moved,
            "bytes_total": move.bytes_total,
            "keys_per_s": None if rate is None else round(rate, 1),
            "eta_s": eta,
            "waiting_for": waiting,
            "transfers": transfers,
            "error": self.errors.get("map") if current else None,
        }

    def _log(self, m: ClusterMap) -> None:
        """A line at each phase change, and about every ``log_interval`` s while a move runs."""
        now = self.clock.seconds()
        phase = "idle" if m.move is None else str(m.move.phase)
        changed = self._logged != (m.epoch, phase)
        if not changed and (m.move is None or now - self._last_log < self.log_interval):
            return
        if self._logged is None and m.move is None:
            self._logged = (m.epoch, phase)
            return
        self._logged, self._last_log = (m.epoch, phase), now
        if m.move is None:
            log.info("rebalance: idle at epoch {epoch}", epoch=m.epoch)
            return
        s = self.status()
        log.info(
            "rebalance epoch {epoch} {phase}{aborted}: {keys_moved}/{keys_total} keys, "
            "{rate} keys/s, eta {eta} s{waiting}",
            epoch=m.epoch,
            phase=phase,
            aborted=" (aborted)" if m.move.aborted else "",
            keys_moved=s["keys_moved"],
            keys_total=s["keys_total"],
            rate="?" if s["keys_per_s"] is None else s["keys_per_s"],
            eta="?" if s["eta_s"] is None else s["eta_s"],
            waiting=f"; waiting for {', '.join(s['waiting_for'])}" if s["waiting_for"] else "",
        )
