"""The in-memory engine: the seed's behaviour, lost on restart."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence

from twisted.internet.defer import Deferred, succeed

from shardkv.core.records import Record
from shardkv.storage.engine import EngineHealth


class MemoryEngine:
    """Records in a dict, with their keys also kept sorted so that a scan in
    pages (a move, a cleanup) costs a binary search per page, not a sort."""

    name = "memory"

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._order: list[str] = []
        self._hints: dict[str, dict[str, Record]] = {}
        self._meta: dict[str, bytes] = {}

    def get(self, key: str) -> Record | None:
        return self._records.get(key)

    latest = get

    def put(self, key: str, record: Record) -> Deferred[bool]:
        return succeed(self._put_now(key, record))

    def put_many(self, items: Sequence[tuple[str, Record]]) -> Deferred[list[bool]]:
        return succeed([self._put_now(key, record) for key, record in items])

    def _put_now(self, key: str, record: Record) -> bool:
        current = self._records.get(key)
        if current is not None and current.version >= record.version:
            return False
        if current is None:
            insort(self._order, key)
        self._records[key] = record
        return True

    def scan(self, start: str = "", limit: int = 1000) -> Iterator[tuple[str, Record]]:
        first = bisect_left(self._order, start)
        keys = self._order[first : first + limit]
        return ((k, self._records[k]) for k in keys if k in self._records)

    def _delete(self, key: str) -> None:
        del self._records[key]
        del self._order[bisect_left(self._order, key)]

    def remove_tombstone(self, key: str, record: Record) -> Deferred[bool]:
        current = self._records.get(key)
        if current is not None and current.tombstone and current.version == record.version:
            self._delete(key)
            return succeed(True)
        return succeed(False)

    def discard(self, key: str, record: Record) -> Deferred[bool]:
        current = self._records.get(key)
        if current is not None and current.version == record.version:
            self._delete(key)
            return succeed(True)
        return succeed(False)

    def put_hint(self, target: str, key: str, record: Record) -> Deferred[bool]:
        waiting = self._hints.setdefault(target, {})
        current = waiting.get(key)
        if current is not None and current.version >= record.version:
            return succeed(False)
        waiting[key] = record
        return succeed(True)

    def hints(self, target: str, limit: int = 100) -> list[tuple[str, Record]]:
        waiting = self._hints.get(target, {})
        return [(k, waiting[k]) for k in sorted(waiting)[:limit]]

    def hint_counts(self) -> dict[str, int]:
        return {target: len(w) for target, w in self._hints.items() if w}

    def remove_hint(self, target: str, key: str, record: Record) -> Deferred[bool]:
        waiting = self._hints.get(target, {})
        current = waiting.get(key)
        if current is None or current.version != record.version:
            return succeed(False)
        del waiting[key]
        return succeed(True)

    def drop_hints(self, target: str) -> Deferred[int]:
        return succeed(len(self._hints.pop(target, {})))

    def get_meta(self, name: str) -> bytes | None:
        return self._meta.get(name)

    def put_meta(self, name: str, value: bytes) -> Deferred[None]:
        self._meta[name] = bytes(value)
        return succeed(None)

    def health(self) -> EngineHealth:
        return EngineHealth(ok=True, writable=True, details={"keys": len(self._records)})

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)
