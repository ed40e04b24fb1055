"""The group committer: batching, map growth, and failing storage, seen through the engine."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

import shardkv.storage.lmdb.engine as lmdb_engine
from shardkv.core.records import Record
from shardkv.errors import StorageFailed, StorageFull
from shardkv.metrics import NodeMetrics
from shardkv.storage.failpoints import Failpoints
from shardkv.storage.lmdb.committer import GroupCommitter
from shardkv.storage.lmdb.engine import LMDBEngine
from tests.storage.helpers import KiB, MakeLMDB, fill, reactor, rec, sleep, v


def test_unknown_durability_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown durability 'sometimes'"):
        GroupCommitter(cast(Any, None), {}, reactor, max_map_size=KiB, durability="sometimes")


@pytest_twisted.ensureDeferred
async def test_group_commit_batches_writes(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    results = await gatherResults([engine.put(f"k{i}", rec(1)) for i in range(500)])
    assert results == [True] * 500
    stats = engine.commit_stats
    assert stats["committed_writes"] == 500
    assert stats["commits"] <= 50, stats
    assert engine.health().details["entries"] == 500


@pytest_twisted.ensureDeferred
async def test_commits_and_syncs_are_observed(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    """An instrumented engine reports each group's size and commit time, and each
    explicit sync (durability ``batch``) to its node's storage metrics."""
    engine = make_lmdb(tmp_path, start=False, durability="batch", batch_interval=0.01)
    metrics = NodeMetrics.private()
    engine.instrument(metrics.storage)
    engine.start()
    await gatherResults([engine.put(f"k{i}", rec(1)) for i in range(50)])
    await engine.stop()

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    assert value("shardkv_storage_group_operations_sum") == 50
    assert value("shardkv_storage_commit_seconds_count") == value(
        "shardkv_storage_group_operations_count"
    )
    assert (value("shardkv_storage_commit_seconds_count") or 0) >= 1
    assert (value("shardkv_storage_fsync_seconds_count") or 0) >= 1


@pytest_twisted.ensureDeferred
async def test_map_grows_when_full(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path, initial_map_size=64 * KiB, max_map_size=64 * 1024 * KiB)
    start = engine.map_size
    value = os.urandom(3000)
    results = await gatherResults([engine.put(f"k{i:04d}", rec(1, value)) for i in range(300)])
    assert results == [True] * 300
    assert engine.map_size > start
    assert engine.commit_stats["map_grows"] >= 1
    assert all(engine.get(f"k{i:04d}") == rec(1, value) for i in range(300))


@pytest_twisted.ensureDeferred
async def test_map_at_cap_fails_writes_keeps_reads_and_recovers_when_raised(
    tmp_path: Path, make_lmdb: MakeLMDB
) -> None:
    engine = make_lmdb(tmp_path, initial_map_size=64 * KiB, max_map_size=256 * KiB)
    stored = await fill(engine, "big", 8 * KiB)
    assert stored > 5
    assert engine.map_size == 256 * KiB
    with pytest.raises(StorageFull) as info:
        await engine.put("one-more", rec(1, bytes(8 * KiB)))
    assert info.value.code == "insufficient_storage"
    assert engine.get("big0000") == rec(1, bytes(8 * KiB)), "reads go on"
    health = engine.health()
    assert health.ok and not health.writable and "full" in health.reason
    engine.set_max_map_size(1024 * KiB)
    assert await engine.put("one-more", rec(1, bytes(8 * KiB))) is True
    assert engine.health().writable


@pytest_twisted.ensureDeferred
async def test_map_at_cap_recovers_once_space_is_freed(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path, initial_map_size=256 * KiB, max_map_size=256 * KiB)
    stored = await fill(engine, "big", 8 * KiB)
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


# -- failing storage -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fsync_eio_fail_stops_without_retry(
    tmp_path: Path, make_lmdb: MakeLMDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDKV_FAILPOINTS", "storage.commit=eio")
    engine = make_lmdb(tmp_path, failpoints=None)
    calls = engine.commit_stats["commit_calls"]
    with pytest.raises(StorageFailed) as info:
        await engine.put("k", rec(1))
    assert info.value.code == "storage_failed"
    assert engine.commit_stats["commit_calls"] == calls + 1, "the commit must not be retried"
    assert engine.get("k") is None
    later = engine.put("k2", rec(1))
    assert later.called, "after fail-stop a put fails at once"
    with pytest.raises(StorageFailed):
        await later
    health = engine.health()
    assert not health.ok and not health.writable
    assert "Input/output error" in health.reason
    assert "restart" in health.reason
    assert engine.commit_stats["commit_calls"] == calls + 1


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
    assert engine.commit_stats["syncs"] >= 1
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
    monkeypatch.setattr(lmdb_engine, "free_bytes", lambda path: 0)
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
        stored = await fill(engine, "big", 20 * KiB)
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
