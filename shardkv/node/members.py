"""The cluster's members, as this node was last told them.

A node keeps hints only for members and hands hints only to members, so a
caller cannot make it store records for, or send them to, an address of its
choosing. Nodes have no membership of their own: the proxy pushes its list
(``PUT /replica/members``) whenever a node's ``/health`` shows another one,
and ``twistd shardkv cluster`` gives it at construction. Until a node has been
told, it refuses every hint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, fail

from shardkv.core.records import Record
from shardkv.errors import NodeUnreachable
from shardkv.replica.client import ReplicaClient


class Members:
    """The current member list, replaced whole by each push."""

    def __init__(self, members: Iterable[str] | None = None) -> None:
        self._members: frozenset[str] | None = None
        if members is not None:
            self.replace(members)

    @property
    def known(self) -> bool:
        """Has this node been told the members yet?"""
        return self._members is not None

    def __contains__(self, node: object) -> bool:
        return self._members is not None and node in self._members

    def replace(self, members: Iterable[str]) -> None:
        self._members = frozenset(members)

    def as_json(self) -> list[str] | None:
        """Sorted, so the proxy can compare it with its own list; None until told."""
        return None if self._members is None else sorted(self._members)


class MemberOnlyClient(ReplicaClient):
    """A replica client that writes only to current members.

    The node's hint handoff uses it, so a hint kept from before the node knew
    the members (or for a node since removed) is never sent anywhere.
    """

    def __init__(self, members: Members, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.members = members

    def replica_put(
        self, node: str, key: str, record: Record, hint_for: str | None = None
    ) -> Deferred[bool]:
        if node not in self.members:
            why = "it is not a member of the cluster, so nothing was sent"
            return fail(NodeUnreachable(node, why, sent=False))
        return super().replica_put(node, key, record, hint_for)
