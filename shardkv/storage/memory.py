"""The in-memory engine: the seed's behaviour, lost on restart."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

from twisted.internet.defer import Deferred, succeed

from shardkv.core.records import Record
from shardkv.storage.engine import EngineHealth


class MemoryEngine:
    name = "memory"

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._hints: dict[str, dict[str, Record]] = {}

    def get(self, key: str) -> Record | None:
        return self._records.get(key)

    latest = get

    def put(self, key: str, record: Record) -> Deferred[bool]:
        current = self._records.get(key)
        if current is not None and current.version >= record.version:
            return succeed(False)
        self._records[key] = record
        return succeed(True)

    def scan(self, start: str = "", limit: int = 1000) -> Iterator[tuple[str, Record]]:
        keys = sorted(k for k in self._records if k >= start)
        return ((k, self._records[k]) for k in islice(keys, limit))

    def remove_tombstone(self, key: str, record: Record) -> Deferred[bool]:
        current = self._records.get(key)
        if current is not None and current.tombstone and current.version == record.version:
            del self._records[key]
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

    def health(self) -> EngineHealth:
        return EngineHealth(ok=True, writable=True, details={"keys": len(self._records)})

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)
