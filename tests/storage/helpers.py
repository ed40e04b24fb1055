"""What the storage tests share: record makers, key sets near LMDB's key limit, pagination."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import lmdb
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater

from shardkv.core.keys import MAX_KEY_BYTES
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.errors import StorageFull
from shardkv.storage.engine import StorageEngine
from shardkv.storage.lmdb.engine import LMDBEngine

reactor = cast(IReactorFromThreads, _reactor)
clock = cast(IReactorTime, _reactor)

KiB = 1024

MakeLMDB = Callable[..., LMDBEngine]


def v(counter: int, clock_ms: int = 0, writer: str = "n1") -> Version:
    return Version(counter, clock_ms, writer)


def rec(counter: int, value: bytes | None = None, writer: str = "n1") -> Record:
    return Record(v(counter, writer=writer), value if value is not None else b"v%d" % counter)


async def sleep(seconds: float) -> None:
    await deferLater(clock, seconds, lambda: None)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (memory engine)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def utf8_len(key: str) -> int:
    return len(key.encode("utf-8"))


# Keys the API accepts (up to MAX_KEY_BYTES), around LMDB's 511-byte key limit.
LONG_KEYS = [
    "k" * 511,
    "k" * 512,
    "k" * MAX_KEY_BYTES,
    "é" * 255 + "a",  # 511 bytes, multi-byte
    "é" * 256,  # 512 bytes
    "a" + "é" * 300,  # 601 bytes; byte 478 falls inside a character
    "\U0001f600" * (MAX_KEY_BYTES // 4),  # 1024 bytes of 4-byte characters
    "中" * 341,  # 1023 bytes
]

MIXED_KEYS = [
    *LONG_KEYS,
    "a",
    "b",
    "zz",
    "é",
    "m" * 477,
    "m" * 478,
    "m" * 479,
    "m" * 478 + "a" * 40,
    "m" * 478 + "z" * 40,
    "m" * 478 + "\xff" * 40,
    "m" * 700,
    "l" * 900,
    "n" * 520,
    "n" * 33,
]


def pages(engine: StorageEngine, step: int) -> list[str]:
    """Every key, paginated the way the tombstone collector does it."""
    seen: list[str] = []
    start = ""
    for _ in range(10_000):
        batch = list(engine.scan(start, step + 1))
        seen += [k for k, _ in batch[:step]]
        if len(batch) <= step:
            return seen
        start = batch[step][0]
    raise AssertionError("pagination did not end")


def pages_after_last(engine: StorageEngine, step: int) -> list[str]:
    """Every key, paginated from the last key returned (which comes back first)."""
    seen: list[str] = []
    start = ""
    for _ in range(10_000):
        batch = [k for k, _ in engine.scan(start, step + 1)]
        if seen:
            assert batch[0] == seen[-1], "scan(start=<a stored key>) begins at that key"
            batch = batch[1:]
        else:
            batch = batch[:step]
        if not batch:
            return seen
        seen += batch
        start = seen[-1]
    raise AssertionError("pagination did not end")


def write_raw(path: Path, key: bytes, raw: bytes) -> None:
    """Store ``raw`` under LMDB key ``key`` in ``records``, behind the engine's back."""
    env = lmdb.open(str(path), max_dbs=16)
    try:
        db = env.open_db(b"records")
        with env.begin(write=True, db=db) as txn:
            txn.put(key, raw)
    finally:
        env.close()


async def fill(engine: LMDBEngine, prefix: str, size: int) -> int:
    """Write ``size``-byte records one by one until the map is full; return how many fit."""
    for i in range(1000):
        try:
            await engine.put(f"{prefix}{i:04d}", rec(1, bytes(size)))
        except StorageFull:
            return i
    raise AssertionError("the map never filled up")


# -- newer-only converges whatever the order (Hypothesis) ----------------------

versions = st.lists(
    st.tuples(st.integers(1, 4), st.integers(0, 2), st.sampled_from(["n1", "n2"])),
    min_size=1,
    max_size=8,
)


def record_for(t: tuple[int, int, str]) -> Record:
    # Equal versions carry equal data, as they do in the cluster.
    return Record(Version(*t), f"{t}".encode())


def model(order: list[tuple[int, int, str]]) -> list[bool]:
    """What a newer-only store answers to each put of ``order``."""
    best: Version | None = None
    out = []
    for t in order:
        version = Version(*t)
        out.append(best is None or version > best)
        best = version if best is None or version > best else best
    return out
