"""The cluster's members, as this node knows them.

A node keeps hints only for members and hands hints only to members, so a
caller cannot make it store records for, or send them to, an address of its
choosing. Once the node has learned a cluster map (L{shardkv.node.mapstore}),
its members are the map's: every member not removed, the leaving ones
included (they still take writes until the move's cleanup). Before that, the
proxy pushes its list (``PUT /replica/members``) whenever a node's ``/health``
shows another one, and ``twistd shardkv cluster`` gives it at construction.
Until a node has been told either way, it refuses every hint.

A learned map wins over a pushed list, and a later push is ignored: the map
is chosen by a majority at an epoch and only moves forward, while a push
comes from whichever proxy spoke last, possibly one that still runs on its
``--nodes`` list. Letting a push win would let a stale proxy make a node
drop hints for a member that joined, or hand hints to one that was removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail

from shardkv.core.records import Record
from shardkv.errors import NodeUnreachable
from shardkv.replica.client import ReplicaClient

if TYPE_CHECKING:
    from shardkv.core.clustermap import ClusterMap
    from shardkv.node.mapstore import MapStore


class Members:
    """The current member list: the learned map's once there is one, else the last push."""

    def __init__(self, members: Iterable[str] | None = None) -> None:
        self._members: frozenset[str] | None = None
        self._epoch: int | None = None
        if members is not None:
            self.replace(members)

    def follow(self, mapstore: MapStore) -> None:
        """Take the members from ``mapstore``'s learned map, now and on each learn."""
        if mapstore.learned is not None:
            self.learned(mapstore.learned)
        mapstore.subscribe(self.learned)

    def learned(self, m: ClusterMap) -> None:
        """Follow map ``m`` (if it is newer than the one followed)."""
        if self._epoch is None or m.epoch > self._epoch:
            self._epoch = m.epoch
            self._members = frozenset(m.acceptors())

    @property
    def from_map(self) -> bool:
        """Do the members come from a learned map (so pushes are ignored)?"""
        return self._epoch is not None

    @property
    def known(self) -> bool:
        """Has this node been told the members yet?"""
        return self._members is not None

    def __contains__(self, node: object) -> bool:
        return self._members is not None and node in self._members

    def replace(self, members: Iterable[str]) -> bool:
        """Take a pushed list; ignored (False) once a map was learned (see the module)."""
        if self.from_map:
            return False
        self._members = frozenset(members)
        return True

    def as_json(self) -> list[str] | None:
        """Sorted, so the proxy can compare it with its own list; None until told."""
        return None if self._members is None else sorted(self._members)


class MemberOnlyClient(ReplicaClient):
    """A replica client that writes only to current members.

    The node's hint handoff uses it, so a hint kept from before the node knew
    the members (or for a node since removed) is never sent anywhere.
    """

    def __init__(
        self,
        members: Members,
        *args: Any,
        epoch: Callable[[], int | None] | None = None,
        **kwargs: Any,
    ) -> None:
        """``epoch``: the node's learned epoch (None: none), sent on every write
        so that a peer holding a newer map refuses it (the hint stays here and
        goes once this node has learned that map too)."""
        super().__init__(*args, **kwargs)
        self.members = members
        self._epoch = epoch

    def replica_put(
        self,
        node: str,
        key: str,
        record: Record,
        hint_for: str | None = None,
        epoch: int | None = None,
    ) -> Deferred[bool]:
        if node not in self.members:
            why = "it is not a member of the cluster, so nothing was sent"
            return fail(NodeUnreachable(node, why, sent=False))
        if epoch is None and self._epoch is not None:
            epoch = self._epoch()
        return super().replica_put(node, key, record, hint_for, epoch=epoch)
