"""Which nodes are up, from periodic checks and from failures seen in requests.

A node marked down is skipped at once instead of paying a connection attempt
or a timeout on every request; the next periodic check brings it back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shardkv.errors import NodeTimeout, NodeUnreachable
from shardkv.periodic import periodic

log = Logger(namespace="shardkv.proxy.health")


@dataclass
class NodeState:
    status: str = "unknown"  # "up", "down" or "unknown" (not checked yet)
    since: float = 0.0
    error: str = ""
    last_check: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "since": self.since or None,
            "last_check": self.last_check or None,
            "error": self.error or None,
        }


class HealthMonitor:
    def __init__(
        self,
        nodes: Iterable[str],
        check: Callable[[str], Awaitable[object]],
        clock: IReactorTime,
        interval: float = 1.0,
    ) -> None:
        self._check = check
        self._clock = clock
        self.interval = interval
        self.states = {node: NodeState() for node in nodes}

    def is_down(self, node: str) -> bool:
        return self.states[node].status == "down"

    def state(self, node: str) -> NodeState:
        return self.states[node]

    def mark(self, node: str, up: bool, error: str = "") -> None:
        state = self.states[node]
        now = self._clock.seconds()
        status = "up" if up else "down"
        if state.status != status:
            log.info(
                "node {node} is {status}{why}",
                node=node,
                status=status,
                why=f": {error}" if error else "",
            )
            state.status, state.since = status, now
        state.error = error
        state.last_check = now

    def call_failed(self, node: str, error: BaseException | None) -> None:
        """A request to ``node`` failed: no answer at all means it is down."""
        if isinstance(error, NodeUnreachable | NodeTimeout):
            self.mark(node, up=False, error=str(error))

    def hints_waiting(self, node: str) -> int:
        """Hints for ``node`` that live nodes reported at their last check."""
        total = 0
        for state in self.states.values():
            if state.status == "up":
                total += int(state.report.get("hints", {}).get(node, 0))
        return total

    def has_hints_waiting(self, node: str) -> bool:
        """True while ``node`` may lack writes it missed: it is not read from alone."""
        return self.hints_waiting(node) > 0

    def check_all(self) -> Deferred[list[None]]:
        return gatherResults([Deferred.fromCoroutine(self._check_one(n)) for n in self.states])

    async def _check_one(self, node: str) -> None:
        try:
            report = await self._check(node)
        except Exception as e:
            self.mark(node, up=False, error=str(e))
        else:
            self.mark(node, up=True)
            self.states[node].report = report if isinstance(report, dict) else {}

    def service(self) -> TimerService:
        return periodic(self.interval, self.check_all, self._clock)
