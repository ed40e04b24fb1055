"""The storage engine contract, for every engine.

The node treats engines as interchangeable, so these tests run against the
in-memory reference and against LMDB in each durability mode. What only a disk
has (persistence, corruption, group commit, a full map or disk, a failing
fsync, a data directory that is locked or unusable) is tested in the modules
for the LMDB engine's parts, under tests/storage/lmdb/.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from shardkv.core.keys import check_key
from shardkv.core.records import Record
from shardkv.storage.engine import StorageEngine
from shardkv.storage.memory import MemoryEngine
from tests.storage.helpers import (
    LONG_KEYS,
    MIXED_KEYS,
    MakeLMDB,
    pages,
    pages_after_last,
    rec,
    utf8_len,
    v,
)

ENGINES = ["memory", "lmdb-always", "lmdb-batch", "lmdb-os"]


@pytest_twisted.async_yield_fixture(params=ENGINES)
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, make_lmdb: MakeLMDB
) -> AsyncIterator[StorageEngine]:
    kind: str = request.param
    if kind == "memory":
        yield MemoryEngine()
        return
    yield make_lmdb(tmp_path / "data", durability=kind.split("-", 1)[1], batch_interval=0.05)


@pytest_twisted.ensureDeferred
async def test_put_get_round_trip(engine: StorageEngine) -> None:
    record = Record(v(1, 5), b"\x00hello\xff", "text/plain", stored_ms=123)
    assert engine.get("k") is None
    assert await engine.put("k", record) is True
    assert engine.get("k") == record
    assert engine.latest("k") == record
    assert engine.get("other") is None


@pytest_twisted.ensureDeferred
async def test_put_many_is_put_for_each_item_in_one_write(engine: StorageEngine) -> None:
    """A stream's bulk write keeps the newer-only rule item by item, a key
    named twice included, and answers one result per item, in order."""
    assert await engine.put("old", rec(5)) is True
    items = [("a", rec(1)), ("old", rec(4)), ("b", rec(2)), ("a", rec(3)), ("old", rec(6))]
    assert await engine.put_many(items) == [True, False, True, True, True]
    assert (engine.get("a"), engine.get("b"), engine.get("old")) == (rec(3), rec(2), rec(6))
    assert engine.latest("a") == rec(3)
    assert await engine.put_many([]) == []


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


@pytest_twisted.ensureDeferred
async def test_every_key_the_api_accepts_is_stored(engine: StorageEngine) -> None:
    assert [utf8_len(k) for k in LONG_KEYS] == [511, 512, 1024, 511, 512, 601, 1024, 1023]
    for key in LONG_KEYS:
        assert check_key(key) == key, "the API accepts it"
        assert engine.get(key) is None
        assert await engine.put(key, rec(2, key.encode())) is True, utf8_len(key)
    for key in LONG_KEYS:
        assert engine.get(key) == engine.latest(key) == rec(2, key.encode()), utf8_len(key)
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


@pytest.mark.parametrize("step", [1, 2, 3, 7, 100])
@pytest_twisted.ensureDeferred
async def test_scan_paginates_across_short_and_long_keys(engine: StorageEngine, step: int) -> None:
    await gatherResults([engine.put(k, rec(1, k.encode())) for k in MIXED_KEYS])
    expected = sorted(MIXED_KEYS)
    for paginate in (pages, pages_after_last):
        got = paginate(engine, step)
        assert len(got) == len(set(got)), f"{paginate.__name__}: a key came back twice"
        assert sorted(got) == expected, paginate.__name__
    assert [k for k, _ in engine.scan(limit=len(MIXED_KEYS) + 5)] == pages(engine, step)
    for key in MIXED_KEYS:
        first = next(iter(engine.scan(key, 1)))
        assert first == (key, rec(1, key.encode())), "scan(start=key) starts at that key"


@pytest_twisted.ensureDeferred
async def test_health_is_ok(engine: StorageEngine) -> None:
    await engine.put("k", rec(1))
    health = engine.health()
    assert health.ok and health.writable and health.reason == ""


@pytest_twisted.ensureDeferred
async def test_discard_deletes_only_the_version_it_names(engine: StorageEngine) -> None:
    await engine.put("k", rec(2))
    assert await engine.discard("k", rec(1)) is False, "an older version names nothing stored"
    assert await engine.discard("k", rec(3)) is False, "nor does a newer one"
    assert engine.get("k") == rec(2)
    assert await engine.discard("k", rec(2)) is True
    assert engine.get("k") is None
    assert await engine.discard("k", rec(2)) is False
    tomb = Record.deleted(v(4))
    await engine.put("t", tomb)
    assert await engine.discard("t", tomb) is True, "tombstones are discarded too"
    assert engine.get("t") is None
    assert await engine.discard("never", rec(1)) is False
    long_key = LONG_KEYS[2]
    await engine.put(long_key, rec(1))
    assert await engine.discard(long_key, rec(1)) is True
    assert engine.get(long_key) is None


@pytest_twisted.ensureDeferred
async def test_a_write_queued_before_a_discard_is_kept(engine: StorageEngine) -> None:
    """Cleanup read version 1; a newer write landed meanwhile: it survives."""
    await engine.put("k", rec(1))
    newer = engine.put("k", rec(2))
    discarded = engine.discard("k", rec(1))
    assert await gatherResults([newer, discarded]) == [True, False]
    assert engine.get("k") == rec(2)


@pytest_twisted.ensureDeferred
async def test_drop_hints_deletes_one_targets_hints(engine: StorageEngine) -> None:
    await gatherResults([engine.put_hint("n2", f"k{i}", rec(1)) for i in range(5)])
    await engine.put_hint("n2", LONG_KEYS[2], rec(1))
    await engine.put_hint("n3", "k0", rec(1))
    await engine.put_hint("n22", "k0", rec(1))
    await engine.put("k0", rec(1))
    assert await engine.drop_hints("n2") == 6
    assert engine.hints("n2") == []
    assert engine.hint_counts() == {"n3": 1, "n22": 1}
    assert engine.hints("n22") == [("k0", rec(1))], "a target whose name starts alike keeps its"
    assert engine.get("k0") == rec(1), "records are not hints"
    assert await engine.drop_hints("n2") == 0
    assert await engine.drop_hints("nobody") == 0
    assert await engine.put_hint("n2", "k0", rec(1)) is True, "a dropped target can hint again"
    assert engine.hint_counts() == {"n2": 1, "n3": 1, "n22": 1}


@pytest_twisted.ensureDeferred
async def test_meta_round_trip(engine: StorageEngine) -> None:
    assert engine.get_meta("map") is None
    await engine.put_meta("map", b'{"epoch": 1}')
    assert engine.get_meta("map") == b'{"epoch": 1}'
    await engine.put_meta("map", b'{"epoch": 2}')
    await engine.put_meta("acceptor", b"\x00\xff")
    assert engine.get_meta("map") == b'{"epoch": 2}'
    assert engine.get_meta("acceptor") == b"\x00\xff"
    for name in ("format", "last_bump"):
        assert engine.get_meta(name) is None, "a name never reads the engine's own keys"
        await engine.put_meta(name, b"mine")
        assert engine.get_meta(name) == b"mine"
    assert list(engine.scan()) == [], "metadata is not a record"
    assert engine.hint_counts() == {}


@pytest_twisted.ensureDeferred
async def test_put_meta_commits_after_the_writes_queued_before_it(engine: StorageEngine) -> None:
    """When put_meta fires, every write queued before it has fired and is committed."""
    writes = [engine.put(f"k{i}", rec(1)) for i in range(50)]
    meta = engine.put_meta("map", b"1")
    fired_before: list[int] = []
    meta.addCallback(lambda _: fired_before.append(sum(1 for d in writes if d.called)))
    await meta
    assert fired_before == [50]
    assert all(engine.get(f"k{i}") == rec(1) for i in range(50))
