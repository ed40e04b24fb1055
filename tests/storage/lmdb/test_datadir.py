"""The data directory: created, locked against a second process, refused when unusable."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
import pytest_twisted

from shardkv.errors import StorageStartupError
from shardkv.storage.failpoints import Failpoints
from shardkv.storage.lmdb.datadir import DataDir
from shardkv.storage.lmdb.engine import LMDBEngine
from tests.storage.helpers import MakeLMDB, reactor, rec


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


@pytest_twisted.ensureDeferred
async def test_another_storage_format_is_refused(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    await engine.stop()
    env = lmdb.open(str(tmp_path), max_dbs=16)
    try:
        with env.begin(write=True, db=env.open_db(b"meta")) as txn:
            txn.put(b"format", b"2")
    finally:
        env.close()
    with pytest.raises(StorageStartupError, match="holds storage format b'2'"):
        engine.start()
    after = DataDir(str(tmp_path))
    after.acquire()  # the failed start let go of the lock
    after.release()


def test_release_lets_another_holder_in(tmp_path: Path) -> None:
    first, second = DataDir(str(tmp_path)), DataDir(str(tmp_path))
    first.acquire()
    with pytest.raises(StorageStartupError, match="in use by another process"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()
