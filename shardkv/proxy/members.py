"""Telling nodes who the members are, as part of each health check.

A node keeps and hands off hints only for members (L{shardkv.node.members}),
and it learns them from the proxy. Each health report carries the node's
list; when it differs from the ring's, the check starts a push of the ring's
list with ``PUT /replica/members``. A restarted node therefore learns the members
within one health interval, and an idle cluster sends nothing extra.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from shardkv.errors import ReplicaCallFailed, ReplicaRefused
from shardkv.replica.client import ReplicaClient
from shardkv.replica.protocol import members_body

log = Logger(namespace="shardkv.proxy.members")

_REFUSED_ACCESS = ("unauthorized", "forbidden")


class MemberAnnouncer:
    """Wraps a health check so that it also brings the node's member list up to date.

    The push runs beside the check, never inside it: a node that answered
    its health check is up whatever the push does, and a slow push under
    load is not a node failure. At most one push per node is out at a time.
    """

    def __init__(
        self,
        members: Iterable[str],
        check: Callable[[str], Awaitable[dict[str, Any]]],
        client: ReplicaClient,
    ) -> None:
        self.members = sorted(members)
        self._body = members_body(self.members)
        self._check = check
        self._client = client
        self._pushing: set[str] = set()
        self._refused: dict[str, ReplicaRefused] = {}
        self.pushes = 0

    async def check(self, node: str) -> dict[str, Any]:
        """The node's health report; starts a push if the node has other members.

        A node that refused our token fails its checks until a push gets
        through, so ``/cluster`` says why every other call to it fails.
        """
        report = await self._check(node)
        if report.get("members") != self.members and node not in self._pushing:
            self._pushing.add(node)
            Deferred.fromCoroutine(self._push(node))
        refused = self._refused.get(node)
        if refused is not None:
            raise refused
        return report

    async def _push(self, node: str) -> None:
        try:
            await self._client.put_members(node, self._body)
        except ReplicaRefused as e:
            if e.code in _REFUSED_ACCESS:
                self._refused[node] = e
            else:
                log.warn("{node} refused the member list: {why}", node=node, why=e.message)
        except ReplicaCallFailed as e:
            log.info("could not tell {node} the members: {why}", node=node, why=e.message)
        except CancelledError:
            pass
        except Exception:
            log.failure("telling {node} the members", node=node)
        else:
            self.pushes += 1
            self._refused.pop(node, None)
        finally:
            self._pushing.discard(node)
