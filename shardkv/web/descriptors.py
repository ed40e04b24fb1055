"""The process's open-file limit, fitted to the connection caps of its sites.

Kept apart from L{shardkv.web.site} because it is per process, not per site:
the one-process cluster runs four sites against one limit.
"""

from __future__ import annotations

import resource as rlimits
from collections.abc import Callable

from twisted.logger import Logger

log = Logger(namespace="shardkv.web")


class DescriptorBudget:
    """The process's open-file limit, shared by every site in it (a cluster runs four).

    Each site reserves its connection cap plus headroom when it starts
    listening. The soft ``RLIMIT_NOFILE`` is raised towards the hard limit to
    fit every reservation, as Redis does for ``maxclients``; when it cannot
    be, the site gets a smaller cap and one log line says so. Either way the
    process does not run out of descriptors (EMFILE), which would stop it
    accepting anyone.
    """

    BASE = 64
    """Descriptors open whatever the sites do: stdio, the log, epoll, the thread pool's pipes."""

    def __init__(
        self,
        getrlimit: Callable[[int], tuple[int, int]] = rlimits.getrlimit,
        setrlimit: Callable[[int, tuple[int, int]], None] = rlimits.setrlimit,
    ) -> None:
        self._get = getrlimit
        self._set = setrlimit
        self.reserved = self.BASE

    def reserve(self, connections: int, headroom: int) -> int:
        """Reserve room for ``connections`` plus ``headroom``; the connections granted."""
        needed = self.reserved + connections + headroom
        soft, hard = self._get(rlimits.RLIMIT_NOFILE)
        if soft != rlimits.RLIM_INFINITY and needed > soft:
            target = needed if hard == rlimits.RLIM_INFINITY else min(needed, hard)
            if target > soft:
                try:
                    self._set(rlimits.RLIMIT_NOFILE, (target, hard))
                    soft = target
                except (OSError, ValueError):
                    pass
        granted = connections
        if soft != rlimits.RLIM_INFINITY:
            granted = max(1, min(connections, soft - self.reserved - headroom))
        if granted < connections:
            log.warn(
                "the open-file limit ({soft}, hard {hard}) fits {granted} connections, not "
                "--max-connections {connections}; serving at most {granted} (raise it with "
                "ulimit -n {needed})",
                soft=soft,
                hard=hard,
                granted=granted,
                connections=connections,
                needed=needed,
            )
        self.reserved += granted + headroom
        return granted

    def release(self, granted: int, headroom: int) -> None:
        self.reserved -= granted + headroom


DESCRIPTORS = DescriptorBudget()
"""This process's budget (the limit is per process, so is this)."""
