"""The LMDB engine: reads inline, writes through the committer, hints, health.

What every engine must do is in tests/storage/test_engine.py; the committer's
failure paths are in test_committer and the data directory's in test_datadir,
beside this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import gatherResults

from shardkv.core.keys import MAX_KEY_BYTES
from shardkv.core.records import CorruptRecord, Record, encode
from shardkv.errors import InvalidHintTarget, StorageError
from shardkv.node.tombstones import TombstoneCollector
from shardkv.storage.failpoints import Failpoints
from shardkv.storage.lmdb.engine import LMDBEngine
from tests.storage.helpers import (
    LONG_KEYS,
    MIXED_KEYS,
    KiB,
    MakeLMDB,
    model,
    pages,
    pages_after_last,
    reactor,
    rec,
    record_for,
    utf8_len,
    v,
    versions,
    write_raw,
)

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
    together = await gatherResults([engine.put(f"q{n}", record_for(t)) for t in shuffled])
    one_by_one = [await engine.put(f"s{n}", record_for(t)) for t in ops]
    assert together == model(shuffled)
    assert one_by_one == model(ops)
    assert engine.get(f"q{n}") == engine.get(f"s{n}") == record_for(max(ops))


# -- reads, overlay, corruption, persistence ------------------------------------


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


@pytest_twisted.ensureDeferred
async def test_corrupt_record_is_detected_and_overwritten(
    tmp_path: Path, make_lmdb: MakeLMDB
) -> None:
    engine = make_lmdb(tmp_path)
    await gatherResults([engine.put("bad", rec(7)), engine.put("good", rec(1))])
    await engine.stop()
    flipped = bytearray(encode(rec(7)))
    flipped[-6] ^= 0x01
    write_raw(tmp_path, b"bad", bytes(flipped))
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


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown durability 'sometimes'"):
        LMDBEngine(str(tmp_path), reactor, durability="sometimes")
    with pytest.raises(ValueError, match="unknown failpoint"):
        LMDBEngine(str(tmp_path), reactor, failpoints=Failpoints("storage.comit=eio"))
    with pytest.raises(ValueError, match="initial_map_size"):
        LMDBEngine(str(tmp_path), reactor, initial_map_size=2, max_map_size=1)


# -- hints, long keys, health ---------------------------------------------------


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
    assert isinstance(info.value, InvalidHintTarget)
    assert info.value.code == "invalid_hint_target"


@pytest_twisted.ensureDeferred
async def test_long_keys_persist_across_restart(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    await gatherResults([engine.put(k, rec(1, k.encode())) for k in MIXED_KEYS])
    await engine.put(LONG_KEYS[2], Record.deleted(v(2), stored_ms=5))
    await engine.stop()
    engine.start()
    for key in MIXED_KEYS:
        want = Record.deleted(v(2), 5) if key == LONG_KEYS[2] else rec(1, key.encode())
        assert engine.get(key) == want, utf8_len(key)
    assert sorted(pages(engine, 4)) == sorted(MIXED_KEYS)
    assert engine.health().details["entries"] == len(MIXED_KEYS)
    assert await engine.put(LONG_KEYS[6], rec(5)) is True
    assert engine.get(LONG_KEYS[6]) == rec(5)


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
    engine = LMDBEngine(str(tmp_path / f"p{next(_example)}"), reactor, failpoints=Failpoints())
    engine.start()
    try:
        await gatherResults([engine.put(k, rec(1, k.encode())) for k in keys])
        for paginate in (pages, pages_after_last):
            got = paginate(engine, step)
            assert sorted(got) == sorted(keys) and len(got) == len(keys), paginate.__name__
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


# -- metadata, discard, dropped hints -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_meta_persists_and_keeps_the_format(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    await engine.put_meta("format", b"not the storage format")
    await engine.put_meta("map", b"m")
    await engine.stop()
    again = make_lmdb(tmp_path)
    assert again.get_meta("format") == b"not the storage format"
    assert again.get_meta("map") == b"m"
    assert again.health().details["entries"] == 0


@pytest_twisted.ensureDeferred
async def test_meta_names_are_checked(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    with pytest.raises(StorageError):
        await engine.put_meta("", b"x")
    with pytest.raises(StorageError):
        await engine.put_meta("n" * 201, b"x")
    with pytest.raises(ValueError):
        engine.get_meta("")


@pytest_twisted.ensureDeferred
async def test_drop_hints_in_steps_and_across_restart(
    tmp_path: Path, make_lmdb: MakeLMDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shardkv.storage.lmdb.engine.DROP_HINTS_STEP", 3)
    engine = make_lmdb(tmp_path)
    await gatherResults([engine.put_hint("n2", f"k{i}", rec(1)) for i in range(7)])
    await engine.put_hint("n3", "k", rec(1))
    assert await engine.drop_hints("n2") == 7
    assert engine.hint_counts() == {"n3": 1}
    await engine.stop()
    again = make_lmdb(tmp_path)
    assert again.hint_counts() == {"n3": 1}
    assert again.hints("n2") == []
    assert await again.drop_hints("\x00bad") == 0
