"""Which nodes are up, from periodic checks and from failures seen in requests.

A node marked down is skipped at once instead of paying a connection attempt
or a timeout on every request; the next periodic check brings it back.

Down means the node cannot answer, never that it answered slowly. Under load
a healthy node (or the proxy itself) takes seconds to answer, and marking it
down then takes a working replica out of every quorum, which turns a slow
cluster into a failing one. So the rule is:

- a request marks its node down only when the connection was refused or broke
  (L{NodeUnreachable}); a request that timed out (L{NodeTimeout}), or one
  refused for lack of room here (L{NodeBusy}), or an error the node answered
  with, marks nothing;
- a health check that gets a definite "no" (connection refused or broken, an
  unhealthy or wrong answer) marks the node down at once;
- a health check that gets no answer within ``check_timeout`` (its own
  deadline, independent of the request timeout) is a strike; the node is
  marked down after ``strikes`` consecutive strikes, and any answer clears
  them.

The nodes checked follow the cluster map (L{HealthMonitor.follow}): a new
member is checked from the next round on (and counts as up until then), a
removed one is dropped.

A killed node refuses connections, so it is down at its first failed request
or check. A paused one (SIGSTOP) accepts connections and answers nothing, so
it is down after ``strikes`` checks: about ``strikes * (check_timeout +
interval)`` seconds, under 4 s with the defaults and a 0.25 s interval.

Each change of a node's status is counted (``shardkv_node_health_flips_total``
in the proxy's L{ProxyMetrics}); ``shardkv_node_up`` is read from L{states}.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shardkv.errors import NodeTimeout, NodeUnreachable
from shardkv.metrics import ProxyMetrics
from shardkv.periodic import periodic

log = Logger(namespace="shardkv.proxy.health")

DEFAULT_CHECK_TIMEOUT = 1.0
"""Seconds a health check may take: /health does no I/O on the node, so a
healthy node answers in milliseconds even under load."""
DEFAULT_STRIKES = 3
"""Consecutive checks without an answer before a node is marked down."""


@dataclass
class NodeState:
    status: str = "unknown"  # "up", "down" or "unknown" (not checked yet)
    since: float = 0.0
    error: str = ""
    last_check: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    strikes: int = 0  # consecutive health checks that got no answer in time

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
        check_timeout: float = DEFAULT_CHECK_TIMEOUT,
        strikes: int = DEFAULT_STRIKES,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        """``metrics``: where status changes are counted (default: a private registry)."""
        self._check = check
        self.metrics = metrics if metrics is not None else ProxyMetrics.private()
        self._clock = clock
        self.interval = interval
        self.check_timeout = check_timeout
        self.strikes = strikes
        self.states = {node: NodeState() for node in nodes}

    def is_down(self, node: str) -> bool:
        state = self.states.get(node)
        return state is not None and state.status == "down"

    def state(self, node: str) -> NodeState:
        """The node's state; one not followed (yet) is unknown."""
        return self.states.get(node) or NodeState()

    def follow(self, nodes: Iterable[str]) -> None:
        """Check exactly ``nodes`` from now on: new ones start unknown, dropped ones go."""
        wanted = set(nodes)
        for node in list(self.states):
            if node not in wanted:
                del self.states[node]
                log.info("no longer checking {node}: it left the cluster map", node=node)
        for node in sorted(wanted - self.states.keys()):
            self.states[node] = NodeState()

    def mark(self, node: str, up: bool, error: str = "") -> None:
        state = self.states.get(node)
        if state is None:
            return
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
            self.metrics.flipped(node, status)
        state.error = error
        state.last_check = now

    def call_failed(self, node: str, error: BaseException | None) -> None:
        """A request to ``node`` failed: a refused or broken connection means it
        is down; a timeout means only that it was slow (see the module's rule)."""
        if isinstance(error, NodeUnreachable):
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
        state = self.states[node]
        check: Deferred[object] = Deferred.fromCoroutine(self._awaited(node))
        check.addTimeout(self.check_timeout, self._clock)
        try:
            report = await check
        except (TimeoutError, NodeTimeout):
            state.strikes += 1
            checks = "check" if state.strikes == 1 else f"{state.strikes} checks in a row"
            why = f"no answer to its health {checks}"
            if state.strikes >= self.strikes:
                self.mark(node, up=False, error=f"{why} (each {self.check_timeout:g} s)")
            else:
                state.error, state.last_check = why, self._clock.seconds()
        except CancelledError:
            return
        except Exception as e:
            state.strikes = 0
            self.mark(node, up=False, error=str(e))
        else:
            state.strikes = 0
            self.mark(node, up=True)
            state.report = report if isinstance(report, dict) else {}

    async def _awaited(self, node: str) -> object:
        return await self._check(node)

    def service(self) -> TimerService:
        return periodic(self.interval, self.check_all, self._clock)
