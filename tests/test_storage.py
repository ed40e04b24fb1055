"""Storage engine tests: one contract, every engine.

The node treats engines as interchangeable, so the contract tests run against
the in-memory reference and against LMDB in each durability mode. The LMDB
tests after them cover what only a disk has: persistence, corruption, group
commit, a full map or disk, a failing fsync, and a data directory that is
locked or unusable.

They use the real global reactor through pytest-twisted (shared notes,
twisted-stack 2d); every engine is stopped in fixture teardown so no writer
thread outlives its test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import lmdb
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater

from shardkv.core.keys import MAX_KEY_BYTES, check_key
from shardkv.core.records import CorruptRecord, Record, encode
from shardkv.core.versions import Version
from shardkv.node.tombstones import TombstoneCollector
from shardkv.storage import lmdbengine
from shardkv.storage.engine import (
    StorageEngine,
    StorageError,
    StorageFailed,
    StorageFull,
    StorageStartupError,
)
from shardkv.storage.lmdbengine import LMDB_MAX_KEY, LONG_KEY_PREFIX, LMDBEngine, db_key
from shardkv.storage.memory import MemoryEngine
from shardkv.storage.writer import Failpoints

reactor = cast(IReactorFromThreads, _reactor)
clock = cast(IReactorTime, _reactor)

KiB = 1024
ENGINES = ["memory", "lmdb-always", "lmdb-batch", "lmdb-os"]

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


@pytest_twisted.async_yield_fixture
async def make_lmdb() -> AsyncIterator[MakeLMDB]:
    made: list[LMDBEngine] = []

    def make(path: Path | str, *, start: bool = True, **kwargs: Any) -> LMDBEngine:
        kwargs.setdefault("failpoints", Failpoints())
        engine = LMDBEngine(str(path), reactor, **kwargs)
        made.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in made:
        await engine.stop()


@pytest_twisted.async_yield_fixture(params=ENGINES)
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, make_lmdb: MakeLMDB
) -> AsyncIterator[StorageEngine]:
    kind: str = request.param
    if kind == "memory":
        yield MemoryEngine()
        return
    yield make_lmdb(tmp_path / "data", durability=kind.split("-", 1)[1], batch_interval=0.05)


# -- the contract, for every engine --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_put_get_round_trip(engine: StorageEngine) -> None:
    record = Record(v(1, 5), b"\x00hello\xff", "text/plain", stored_ms=123)
    assert engine.get("k") is None
    assert await engine.put("k", record) is True
    assert engine.get("k") == record
    assert engine.latest("k") == record
    assert engine.get("other") is None


@pytest_twisted.ensureDeferred
async def test_newer_only_rejects_older_and_equal(engine: StorageEngine) -> None:
    assert await engine.put("k", rec(2)) is True
    assert await engine.put("k", rec(1)) is False
    assert await engine.put("k", rec(2, b"same version, other bytes")) is False
    assert engine.get("k") == rec(2)
    assert await engine.put("k", Record(v(2, 1), b"tie broken by clock")) is True
    assert await engine.put("k", rec(2, writer="n2")) is False
    assert await engine.put("k", Record(v(2, 1, "n2"), b"tie broken by writer")) is True
    assert engine.get("k") == Record(v(2, 1, "n2"), b"tie broken by writer")


@pytest_twisted.ensureDeferred
async def test_any_order_gives_the_same_final_state(engine: StorageEngine) -> None:
    records = [rec(3), rec(1), rec(5), rec(2), rec(5), rec(4)]
    for name, order in (("fwd", records), ("rev", records[::-1])):
        results = await gatherResults([engine.put(name, r) for r in order])
        assert results.count(True) >= 1
    assert engine.get("fwd") == engine.get("rev") == rec(5)


@pytest_twisted.ensureDeferred
async def test_tombstones(engine: StorageEngine) -> None:
    await engine.put("k", rec(1))
    tomb = Record.deleted(v(2), stored_ms=99)
    assert await engine.put("k", tomb) is True
    assert engine.get("k") == tomb
    assert await engine.put("k", rec(1)) is False, "a stale write must not resurrect the key"
    assert await engine.remove_tombstone("k", Record.deleted(v(3))) is False
    assert await engine.remove_tombstone("k", tomb) is True
    assert engine.get("k") is None
    assert await engine.remove_tombstone("k", tomb) is False
    await engine.put("live", rec(1))
    assert await engine.remove_tombstone("live", Record.deleted(v(1))) is False
    assert engine.get("live") == rec(1)


@pytest_twisted.ensureDeferred
async def test_scan_order_start_and_limit(engine: StorageEngine) -> None:
    keys = ["b", "a", "c/1", "c", "é", "d"]
    await gatherResults([engine.put(k, rec(1, k.encode())) for k in keys])
    all_items = list(engine.scan())
    assert [k for k, _ in all_items] == sorted(keys, key=lambda k: k.encode())
    assert [k for k, _ in engine.scan("c")] == ["c", "c/1", "d", "é"]
    assert [k for k, _ in engine.scan("bb", limit=2)] == ["c", "c/1"]
    assert list(engine.scan(limit=0)) == []
    assert dict(all_items)["é"] == rec(1, "é".encode())


@pytest_twisted.ensureDeferred
async def test_hints_are_kept_apart_per_target(engine: StorageEngine) -> None:
    assert await engine.put_hint("n2", "b", rec(1)) is True
    assert await engine.put_hint("n2", "a", rec(2)) is True
    assert await engine.put_hint("n3", "a", rec(1)) is True
    assert await engine.put_hint("n2", "a", rec(1)) is False, "hints are newer-only too"
    assert await engine.put_hint("n2", "a", rec(3)) is True
    assert engine.get("a") is None, "a hint is not one of the node's own records"
    assert engine.hints("n2") == [("a", rec(3)), ("b", rec(1))]
    assert engine.hints("n2", limit=1) == [("a", rec(3))]
    assert engine.hints("n4") == []
    assert engine.hint_counts() == {"n2": 2, "n3": 1}
    assert await engine.remove_hint("n2", "a", rec(2)) is False, "a newer hint replaced it"
    assert await engine.remove_hint("n2", "a", rec(3)) is True
    assert await engine.remove_hint("n3", "a", rec(1)) is True
    assert engine.hint_counts() == {"n2": 1}
    assert engine.hints("n2") == [("b", rec(1))]


def _utf8_len(key: str) -> int:
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


@pytest_twisted.ensureDeferred
async def test_every_key_the_api_accepts_is_stored(engine: StorageEngine) -> None:
    assert [_utf8_len(k) for k in LONG_KEYS] == [511, 512, 1024, 511, 512, 601, 1024, 1023]
    for key in LONG_KEYS:
        assert check_key(key) == key, "the API accepts it"
        assert engine.get(key) is None
        assert await engine.put(key, rec(2, key.encode())) is True, _utf8_len(key)
    for key in LONG_KEYS:
        assert engine.get(key) == engine.latest(key) == rec(2, key.encode()), _utf8_len(key)
    assert await engine.put(LONG_KEYS[2], rec(1)) is False, "newer-only holds for long keys"
    assert engine.get("k" * 513) is None and engine.get("k" * 1023) is None
    tomb = Record.deleted(v(3))
    assert await engine.put(LONG_KEYS[2], tomb) is True
    assert engine.get(LONG_KEYS[2]) == tomb
    assert await engine.remove_tombstone(LONG_KEYS[2], Record.deleted(v(4))) is False
    assert await engine.remove_tombstone(LONG_KEYS[1], Record.deleted(v(2))) is False
    assert await engine.remove_tombstone(LONG_KEYS[2], tomb) is True
    assert engine.get(LONG_KEYS[2]) is None
    assert engine.get(LONG_KEYS[1]) == rec(2, LONG_KEYS[1].encode())
    scanned = dict(engine.scan())
    assert set(scanned) == set(LONG_KEYS) - {LONG_KEYS[2]}
    assert all(scanned[k] == rec(2, k.encode()) for k in scanned)


@pytest_twisted.ensureDeferred
async def test_long_keys_sharing_a_prefix_stay_apart(engine: StorageEngine) -> None:
    """Keys equal in their first 478+ bytes (what a long LMDB key keeps) are distinct."""
    base = "p" * 600
    keys = [base, base + "a", base + "b", base[:-1] + "q", "p" * 511, "p" * 479]
    for i, key in enumerate(keys):
        assert await engine.put(key, rec(1, b"%d" % i)) is True
    for i, key in enumerate(keys):
        assert engine.get(key) == rec(1, b"%d" % i)
    assert sorted(k for k, _ in engine.scan()) == sorted(keys)


def _pages(engine: StorageEngine, step: int) -> list[str]:
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


def _pages_after_last(engine: StorageEngine, step: int) -> list[str]:
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


@pytest.mark.parametrize("step", [1, 2, 3, 7, 100])
@pytest_twisted.ensureDeferred
async def test_scan_paginates_across_short_and_long_keys(engine: StorageEngine, step: int) -> None:
    await gatherResults([engine.put(k, rec(1, k.encode())) for k in MIXED_KEYS])
    expected = sorted(MIXED_KEYS)
    for pages in (_pages, _pages_after_last):
        got = pages(engine, step)
        assert len(got) == len(set(got)), f"{pages.__name__}: a key came back twice"
        assert sorted(got) == expected, pages.__name__
    assert [k for k, _ in engine.scan(limit=len(MIXED_KEYS) + 5)] == _pages(engine, step)
    for key in MIXED_KEYS:
        first = next(iter(engine.scan(key, 1)))
        assert first == (key, rec(1, key.encode())), "scan(start=key) starts at that key"


@pytest_twisted.ensureDeferred
async def test_health_is_ok(engine: StorageEngine) -> None:
    await engine.put("k", rec(1))
    health = engine.health()
    assert health.ok and health.writable and health.reason == ""


# -- newer-only converges whatever the order (Hypothesis) ----------------------

versions = st.lists(
    st.tuples(st.integers(1, 4), st.integers(0, 2), st.sampled_from(["n1", "n2"])),
    min_size=1,
    max_size=8,
)


def _record_for(t: tuple[int, int, str]) -> Record:
    # Equal versions carry equal data, as they do in the cluster.
    return Record(Version(*t), f"{t}".encode())


def _model(order: list[tuple[int, int, str]]) -> list[bool]:
    best: Version | None = None
    out = []
    for t in order:
        version = Version(*t)
        out.append(best is None or version > best)
        best = version if best is None or version > best else best
    return out


@given(versions, st.randoms(use_true_random=False))
def test_property_memory_converges(ops: list[tuple[int, int, str]], rnd: Any) -> None:
    shuffled = list(ops)
    rnd.shuffle(shuffled)
    finals = []
    for order in (ops, shuffled):
        engine = MemoryEngine()
        results = [result_of(engine.put("k", _record_for(t))) for t in order]
        assert results == _model(order)
        finals.append(engine.get("k"))
    assert finals[0] == finals[1] == _record_for(max(ops))


_example = iter(range(1_000_000))


@pytest.fixture
def prop_engine(tmp_path: Path, make_lmdb: MakeLMDB) -> LMDBEngine:
    """One engine for all of a Hypothesis run's examples; each example uses fresh keys."""
    return make_lmdb(tmp_path)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=versions, rnd=st.randoms(use_true_random=False))
@pytest_twisted.ensureDeferred
async def test_property_lmdb_converges(
    prop_engine: LMDBEngine, ops: list[tuple[int, int, str]], rnd: Any
) -> None:
    engine = prop_engine
    shuffled = list(ops)
    rnd.shuffle(shuffled)
    n = next(_example)
    together = await gatherResults([engine.put(f"q{n}", _record_for(t)) for t in shuffled])
    one_by_one = [await engine.put(f"s{n}", _record_for(t)) for t in ops]
    assert together == _model(shuffled)
    assert one_by_one == _model(ops)
    assert engine.get(f"q{n}") == engine.get(f"s{n}") == _record_for(max(ops))


# -- LMDB: reads, overlay, corruption, persistence ------------------------------


@pytest_twisted.ensureDeferred
async def test_latest_sees_queued_writes(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path, failpoints=Failpoints("storage.commit.sleep_ms=200"))
    d1 = engine.put("k", rec(1))
    d2 = engine.put("k", rec(3))
    d3 = engine.put("k", rec(2))
    assert engine.get("k") is None
    assert engine.latest("k") == rec(3)
    assert await gatherResults([d1, d2, d3]) == [True, True, False]
    engine.failpoints.clear()
    assert engine.get("k") == engine.latest("k") == rec(3)
    assert engine.health().details["pending_keys"] == 0


@pytest_twisted.ensureDeferred
async def test_latest_prefers_a_newer_stored_record(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    await engine.put("k", rec(5))
    engine.failpoints.set("storage.commit.sleep_ms", "100")
    d = engine.put("k", rec(4))
    assert engine.latest("k") == rec(5)
    assert await d is False


def _write_raw(path: Path, key: bytes, raw: bytes) -> None:
    env = lmdb.open(str(path), max_dbs=16)
    try:
        db = env.open_db(b"records")
        with env.begin(write=True, db=db) as txn:
            txn.put(key, raw)
    finally:
        env.close()


@pytest_twisted.ensureDeferred
async def test_corrupt_record_is_detected_and_overwritten(
    tmp_path: Path, make_lmdb: MakeLMDB
) -> None:
    engine = make_lmdb(tmp_path)
    await gatherResults([engine.put("bad", rec(7)), engine.put("good", rec(1))])
    await engine.stop()
    flipped = bytearray(encode(rec(7)))
    flipped[-6] ^= 0x01
    _write_raw(tmp_path, b"bad", bytes(flipped))
    engine.start()
    with pytest.raises(CorruptRecord):
        engine.get("bad")
    with pytest.raises(CorruptRecord):
        engine.latest("bad")
    assert [k for k, _ in engine.scan()] == ["good"], "scan skips corrupt records"
    assert await engine.put("bad", rec(1)) is True, "a corrupt record is overwritten"
    assert engine.get("bad") == rec(1)


@pytest.mark.parametrize("durability", ["always", "batch", "os"])
@pytest_twisted.ensureDeferred
async def test_records_persist_across_restart(
    tmp_path: Path, make_lmdb: MakeLMDB, durability: str
) -> None:
    engine = make_lmdb(tmp_path, durability=durability)
    await engine.put("k", rec(2))
    await engine.put("t", Record.deleted(v(3)))
    await engine.stop()
    again = make_lmdb(tmp_path, durability=durability)
    assert again.get("k") == rec(2)
    assert again.get("t") == Record.deleted(v(3))
    assert again.health().details["entries"] == 2


@pytest_twisted.ensureDeferred
async def test_stop_commits_everything_queued(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    queued = [engine.put(f"k{i}", rec(1)) for i in range(200)]
    await engine.stop()
    assert all(d.called for d in queued)
    assert await gatherResults(queued) == [True] * 200
    with pytest.raises(StorageError):
        await engine.put("late", rec(1))
    with pytest.raises(StorageError):
        engine.get("k1")
    engine.start()
    assert engine.get("k199") == rec(1)


# -- LMDB: group commit and map growth -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_group_commit_batches_writes(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    results = await gatherResults([engine.put(f"k{i}", rec(1)) for i in range(500)])
    assert results == [True] * 500
    stats = engine.writer_stats
    assert stats["committed_writes"] == 500
    assert stats["commits"] <= 50, stats
    assert engine.health().details["entries"] == 500


@pytest_twisted.ensureDeferred
async def test_map_grows_when_full(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path, initial_map_size=64 * KiB, max_map_size=64 * 1024 * KiB)
    start = engine.map_size
    value = os.urandom(3000)
    results = await gatherResults([engine.put(f"k{i:04d}", rec(1, value)) for i in range(300)])
    assert results == [True] * 300
    assert engine.map_size > start
    assert engine.writer_stats["map_grows"] >= 1
    assert all(engine.get(f"k{i:04d}") == rec(1, value) for i in range(300))


async def _fill(engine: LMDBEngine, prefix: str, size: int) -> int:
    """Write ``size``-byte records one by one until the map is full; return how many fit."""
    for i in range(1000):
        try:
            await engine.put(f"{prefix}{i:04d}", rec(1, bytes(size)))
        except StorageFull:
            return i
    raise AssertionError("the map never filled up")


@pytest_twisted.ensureDeferred
async def test_map_at_cap_fails_writes_keeps_reads_and_recovers_when_raised(
    tmp_path: Path, make_lmdb: MakeLMDB
) -> None:
    engine = make_lmdb(tmp_path, initial_map_size=64 * KiB, max_map_size=256 * KiB)
    stored = await _fill(engine, "big", 8 * KiB)
    assert stored > 5
    assert engine.map_size == 256 * KiB
    with pytest.raises(StorageFull) as info:
        await engine.put("one-more", rec(1, bytes(8 * KiB)))
    assert info.value.status == 507
    assert engine.get("big0000") == rec(1, bytes(8 * KiB)), "reads go on"
    health = engine.health()
    assert health.ok and not health.writable and "full" in health.reason
    engine.set_max_map_size(1024 * KiB)
    assert await engine.put("one-more", rec(1, bytes(8 * KiB))) is True
    assert engine.health().writable


@pytest_twisted.ensureDeferred
async def test_map_at_cap_recovers_once_space_is_freed(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path, initial_map_size=256 * KiB, max_map_size=256 * KiB)
    stored = await _fill(engine, "big", 8 * KiB)
    tomb = Record.deleted(v(2))
    # One commit frees the pages; LMDB reuses them only after a later commit,
    # which the engine makes itself when a write finds the map full.
    assert await gatherResults([engine.put(f"big{i:04d}", tomb) for i in range(4)]) == [True] * 4
    assert await engine.put("after", rec(1, bytes(8 * KiB))) is True
    removed = [engine.remove_tombstone(f"big{i:04d}", tomb) for i in range(4)]
    assert await gatherResults(removed) == [True] * 4
    assert engine.get("big0000") is None
    assert engine.get(f"big{stored - 1:04d}") == rec(1, bytes(8 * KiB))
    assert engine.health().writable


# -- LMDB: failing storage ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fsync_eio_fail_stops_without_retry(
    tmp_path: Path, make_lmdb: MakeLMDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDKV_FAILPOINTS", "storage.commit=eio")
    engine = make_lmdb(tmp_path, failpoints=None)
    calls = engine.writer_stats["commit_calls"]
    with pytest.raises(StorageFailed) as info:
        await engine.put("k", rec(1))
    assert info.value.status == 503
    assert engine.writer_stats["commit_calls"] == calls + 1, "the commit must not be retried"
    assert engine.get("k") is None
    later = engine.put("k2", rec(1))
    assert later.called, "after fail-stop a put fails at once"
    with pytest.raises(StorageFailed):
        await later
    health = engine.health()
    assert not health.ok and not health.writable
    assert "Input/output error" in health.reason
    assert "restart" in health.reason
    assert engine.writer_stats["commit_calls"] == calls + 1


@pytest_twisted.ensureDeferred
async def test_fail_stop_fails_writes_queued_behind_the_failed_commit(
    tmp_path: Path, make_lmdb: MakeLMDB
) -> None:
    engine = make_lmdb(tmp_path)
    await engine.put("old", rec(1))
    engine.failpoints.set("storage.commit", "erofs")
    engine.failpoints.set("storage.commit.sleep_ms", "50")
    queued = [engine.put(f"k{i}", rec(1)) for i in range(50)]
    for d in queued:
        with pytest.raises(StorageFailed):
            await d
    assert "Read-only file system" in engine.health().reason
    assert engine.get("old") == rec(1), "reads go on after fail-stop"


@pytest_twisted.ensureDeferred
async def test_disk_full_fails_the_batch_then_recovers(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path, failpoints=Failpoints("storage.commit=2*enospc"))
    for _ in range(2):
        with pytest.raises(StorageFull) as info:
            await engine.put("k", rec(1))
        assert "No space left on device" in str(info.value)
    health = engine.health()
    assert health.ok and not health.writable and "disk full" in health.reason
    assert await engine.put("k", rec(1)) is True
    assert engine.health().writable
    assert engine.get("k") == rec(1)


@pytest_twisted.ensureDeferred
async def test_batch_mode_syncs_and_fail_stops_on_sync_error(
    tmp_path: Path, make_lmdb: MakeLMDB
) -> None:
    engine = make_lmdb(tmp_path, durability="batch", batch_interval=0.05)
    await engine.put("k", rec(1))
    await sleep(0.2)
    assert engine.writer_stats["syncs"] >= 1
    engine.failpoints.set("storage.sync", "eio")
    assert await engine.put("k2", rec(1)) is True, "batch acks at commit, before the sync"
    for _ in range(40):
        if not engine.health().ok:
            break
        await sleep(0.05)
    health = engine.health()
    assert not health.ok and "env.sync failed" in health.reason
    with pytest.raises(StorageFailed):
        await engine.put("k3", rec(1))


@pytest_twisted.ensureDeferred
async def test_eio_from_a_short_write_on_a_full_disk_counts_as_full(
    tmp_path: Path, make_lmdb: MakeLMDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LMDB reports a pwrite cut short by a full disk as EIO, not ENOSPC.
    monkeypatch.setattr(lmdbengine, "free_bytes", lambda path: 0)
    engine = make_lmdb(tmp_path, failpoints=Failpoints("storage.commit=eio"))
    with pytest.raises(StorageFull, match="0 bytes free"):
        await engine.put("k", rec(1))
    assert engine.health().ok
    assert await engine.put("k", rec(1)) is True


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, for a disk that really fills up (needs root and mount)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest_twisted.ensureDeferred
async def test_real_disk_full_fails_writes_then_recovers(tiny_tmpfs: Path) -> None:
    engine = LMDBEngine(
        str(tiny_tmpfs / "data"), reactor, initial_map_size=64 * KiB, failpoints=Failpoints()
    )
    engine.start()
    try:
        stored = await _fill(engine, "big", 20 * KiB)
        assert stored > 10
        health = engine.health()
        assert health.ok and not health.writable and "disk full" in health.reason
        assert engine.get("big0000") == rec(1, bytes(20 * KiB))
        tomb = Record.deleted(v(2))
        for i in range(5):
            assert await engine.put(f"big{i:04d}", tomb) is True
        assert await engine.put("after", rec(1, bytes(20 * KiB))) is True
        assert engine.health().writable
    finally:
        await engine.stop()
    engine.start()
    assert engine.get("after") == rec(1, bytes(20 * KiB))
    await engine.stop()


# -- LMDB: start-up errors ------------------------------------------------------


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    (tmp_path / "data").mkdir()
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(tmp_path / 'data' / 'shardkv.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


@pytest_twisted.ensureDeferred
async def test_directory_locked_by_another_process(
    tmp_path: Path, make_lmdb: MakeLMDB, lock_holder: subprocess.Popen[str]
) -> None:
    engine = make_lmdb(tmp_path / "data", start=False)
    with pytest.raises(StorageStartupError) as info:
        engine.start()
    assert str(info.value) == (
        f"data directory {tmp_path / 'data'} is in use by another process (pid {lock_holder.pid})"
    )
    lock_holder.kill()
    lock_holder.wait()
    engine.start()
    assert (tmp_path / "data" / "shardkv.lock").read_text().strip() == str(os.getpid())


@pytest_twisted.ensureDeferred
async def test_second_engine_on_the_same_directory(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    make_lmdb(tmp_path)
    with pytest.raises(StorageStartupError, match=r"in use by another process \(pid \d+\)"):
        make_lmdb(tmp_path)


def test_data_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    engine = LMDBEngine(str(tmp_path / "file"), reactor, failpoints=Failpoints())
    with pytest.raises(StorageStartupError, match="exists and is not a directory"):
        engine.start()
    under = LMDBEngine(str(tmp_path / "file" / "data"), reactor, failpoints=Failpoints())
    with pytest.raises(StorageStartupError) as info:
        under.start()
    assert str(tmp_path / "file" / "data") in str(info.value)
    assert "cannot create data directory" in str(info.value)
    assert "not a directory" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write any directory")
def test_unwritable_directory(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.mkdir(mode=0o500)
    engine = LMDBEngine(str(path), reactor, failpoints=Failpoints())
    with pytest.raises(StorageStartupError, match="not readable and writable"):
        engine.start()


@pytest_twisted.ensureDeferred
async def test_missing_directories_are_created(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path / "a" / "b" / "c")
    assert await engine.put("k", rec(1)) is True
    assert (tmp_path / "a" / "b" / "c" / "data.mdb").exists()


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown durability 'sometimes'"):
        LMDBEngine(str(tmp_path), reactor, durability="sometimes")
    with pytest.raises(ValueError, match="unknown failpoint"):
        LMDBEngine(str(tmp_path), reactor, failpoints=Failpoints("storage.comit=eio"))
    with pytest.raises(ValueError, match="initial_map_size"):
        LMDBEngine(str(tmp_path), reactor, initial_map_size=2, max_map_size=1)


# -- LMDB: odds and ends --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hints_persist_and_take_any_key_length(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    target = "127.0.0.1:8002"
    long_key = "x" * 600
    near = "y" * (511 - len(target) - 1)
    for key in (long_key, near + "z", near, "a"):
        assert await engine.put_hint(target, key, rec(1)) is True
    assert await engine.put_hint(target, long_key, rec(2)) is True
    assert await engine.put_hint("127.0.0.1:8003", "a", rec(1)) is True
    await engine.stop()
    engine.start()
    assert engine.hint_counts() == {target: 4, "127.0.0.1:8003": 1}
    got = dict(engine.hints(target))
    assert got == {"a": rec(1), near: rec(1), near + "z": rec(1), long_key: rec(2)}
    assert [k for k, _ in engine.hints(target)][:2] == ["a", near], "direct keys in key order"
    assert await engine.remove_hint(target, long_key, rec(2)) is True
    assert engine.hint_counts()[target] == 3
    with pytest.raises(StorageError) as info:
        await engine.put_hint("bad\x00target", "k", rec(1))
    assert info.value.status == 400


@pytest_twisted.ensureDeferred
async def test_long_keys_layout_on_disk(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    for key in LONG_KEYS:
        await engine.put(key, rec(1))
    await engine.stop()
    env = lmdb.open(str(tmp_path), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin(db=env.open_db(b"records", create=False)) as txn:
            stored = list(txn.cursor().iternext(values=False))
    finally:
        env.close()
    assert max(len(k) for k in stored) == LMDB_MAX_KEY
    long_ones = [k for k in stored if b"\xff" in k]
    assert sorted(long_ones) == sorted(
        db_key(k.encode()) for k in LONG_KEYS if _utf8_len(k) > LMDB_MAX_KEY
    )
    assert all(k[LONG_KEY_PREFIX] == 0xFF for k in long_ones)
    assert len(stored) == len(LONG_KEYS), "one LMDB entry per record, long or short"


@pytest_twisted.ensureDeferred
async def test_long_keys_persist_across_restart(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    await gatherResults([engine.put(k, rec(1, k.encode())) for k in MIXED_KEYS])
    await engine.put(LONG_KEYS[2], Record.deleted(v(2), stored_ms=5))
    await engine.stop()
    engine.start()
    for key in MIXED_KEYS:
        want = Record.deleted(v(2), 5) if key == LONG_KEYS[2] else rec(1, key.encode())
        assert engine.get(key) == want, _utf8_len(key)
    assert sorted(_pages(engine, 4)) == sorted(MIXED_KEYS)
    assert engine.health().details["entries"] == len(MIXED_KEYS)
    assert await engine.put(LONG_KEYS[6], rec(5)) is True
    assert engine.get(LONG_KEYS[6]) == rec(5)


@pytest_twisted.ensureDeferred
async def test_corrupt_long_key_record_is_detected(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    bad, good = "b" * 700, "g" * 700
    await gatherResults([engine.put(bad, rec(7)), engine.put(good, rec(1))])
    await engine.stop()
    # The embedded key no longer matches the digest in the LMDB key.
    wrong = "c" * 700
    _write_raw(tmp_path, db_key(bad.encode()), b"\x02\xbc" + wrong.encode() + encode(rec(7)))
    engine.start()
    with pytest.raises(CorruptRecord):
        engine.get(bad)
    assert [k for k, _ in engine.scan()] == [good], "scan skips it"
    assert await engine.put(bad, rec(1)) is True, "a corrupt record is overwritten"
    assert engine.get(bad) == rec(1)


@pytest_twisted.ensureDeferred
async def test_tombstone_collector_removes_long_key_tombstones(
    tmp_path: Path, make_lmdb: MakeLMDB
) -> None:
    engine = make_lmdb(tmp_path)
    await gatherResults([engine.put(k, rec(1)) for k in MIXED_KEYS])
    dead = MIXED_KEYS[::2]
    await gatherResults([engine.put(k, Record.deleted(v(2), stored_ms=1)) for k in dead])
    collector = TombstoneCollector(engine, lambda: 10_000, grace_seconds=1, step=3)
    await collector.collect()
    assert collector.collected == len(dead)
    assert sorted(k for k, _ in engine.scan()) == sorted(set(MIXED_KEYS) - set(dead))


def _keys_with_shared_prefixes() -> st.SearchStrategy[list[str]]:
    part = st.text(st.sampled_from("aé中\U0001f600"), min_size=0, max_size=12)
    stem = st.sampled_from(["", "s" * 470, "s" * 478, "s" * 476 + "é", "s" * 600])
    key = st.builds(
        lambda a, b: (a + b).encode()[:MAX_KEY_BYTES].decode("utf-8", "ignore"), stem, part
    ).filter(bool)
    return st.lists(key, min_size=1, max_size=30, unique=True)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(keys=_keys_with_shared_prefixes(), step=st.integers(1, 6))
@pytest_twisted.ensureDeferred
async def test_property_pagination_visits_every_key_once(
    tmp_path: Path, keys: list[str], step: int
) -> None:
    engine = LMDBEngine(
        str(tmp_path / f"p{next(_example)}"), reactor, failpoints=Failpoints(), max_batch=1000
    )
    engine.start()
    try:
        await gatherResults([engine.put(k, rec(1, k.encode())) for k in keys])
        for pages in (_pages, _pages_after_last):
            got = pages(engine, step)
            assert sorted(got) == sorted(keys) and len(got) == len(keys), pages.__name__
        assert all(engine.get(k) == rec(1, k.encode()) for k in keys)
    finally:
        await engine.stop()


@pytest_twisted.ensureDeferred
async def test_hints_with_keys_up_to_1024_bytes(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    target = "node-" + "t" * 200
    for key in LONG_KEYS:
        assert await engine.put_hint(target, key, rec(1, key.encode())) is True
        assert await engine.put_hint(target, key, rec(1)) is False, "newer-only"
    assert engine.get(LONG_KEYS[2]) is None, "a hint is not a record"
    await engine.stop()
    engine.start()
    assert engine.hint_counts() == {target: len(LONG_KEYS)}
    got = engine.hints(target, limit=100)
    assert dict(got) == {k: rec(1, k.encode()) for k in LONG_KEYS}
    assert len(got) == len(LONG_KEYS)
    removed = await gatherResults(
        [engine.remove_hint(target, k, rec(1, k.encode())) for k in LONG_KEYS]
    )
    assert removed == [True] * len(LONG_KEYS)
    assert engine.hint_counts() == {} and engine.hints(target) == []


@pytest_twisted.ensureDeferred
async def test_health_details(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path, durability="batch")
    await gatherResults([engine.put(f"k{i}", rec(1)) for i in range(10)])
    details = engine.health().details
    for name in (
        "path",
        "durability",
        "map_size",
        "used_bytes",
        "entries",
        "queue_depth",
        "commits",
        "average_batch",
        "last_commit_ms",
    ):
        assert name in details, name
    assert details["path"] == str(tmp_path)
    assert details["durability"] == "batch"
    assert details["entries"] == 10
    assert details["map_size"] == 64 * 1024 * KiB
    await engine.stop()
    stopped = engine.health()
    assert not stopped.ok and "not running" in stopped.reason


def test_failpoint_parser() -> None:
    fp = Failpoints("storage.commit=2*eio; storage.commit.sleep_ms=5,net.delay_ms=9")
    assert fp.active() == {
        "storage.commit": "2*eio",
        "storage.commit.sleep_ms": "5",
        "net.delay_ms": "9",
    }
    assert [fp.take("storage.commit") for _ in range(3)] == ["eio", "eio", None]
    assert [fp.take("storage.commit.sleep_ms") for _ in range(2)] == ["5", "5"]
    fp.set("storage.sync", "*enospc")
    assert [fp.take("storage.sync") for _ in range(3)] == ["enospc"] * 3
    fp.set("storage.sync", "off")
    assert fp.take("storage.sync") is None
    assert Failpoints.from_env({}).active() == {}
    for bad in ("storage.commit", "storage.commit=boom", "storage.commit=x*eio", "storage.x=1"):
        with pytest.raises(ValueError):
            Failpoints(bad)
