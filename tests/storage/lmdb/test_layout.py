"""The LMDB key layout: long keys on disk, and what the layout functions check."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from shardkv.core.records import CorruptRecord, encode
from shardkv.storage.lmdb.layout import (
    LMDB_MAX_KEY,
    LONG_KEY_PREFIX,
    db_key,
    decode_hint,
    hint_key,
    is_bad_target,
    is_hint_of,
    pack_hint,
    pack_stored,
    unpack_stored,
)
from tests.storage.helpers import LONG_KEYS, MakeLMDB, rec, utf8_len, write_raw


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
        db_key(k.encode()) for k in LONG_KEYS if utf8_len(k) > LMDB_MAX_KEY
    )
    assert all(k[LONG_KEY_PREFIX] == 0xFF for k in long_ones)
    assert len(stored) == len(LONG_KEYS), "one LMDB entry per record, long or short"


@pytest_twisted.ensureDeferred
async def test_corrupt_long_key_record_is_detected(tmp_path: Path, make_lmdb: MakeLMDB) -> None:
    engine = make_lmdb(tmp_path)
    bad, good = "b" * 700, "g" * 700
    await gatherResults([engine.put(bad, rec(7)), engine.put(good, rec(1))])
    await engine.stop()
    # The embedded key no longer matches the digest in the LMDB key.
    wrong = "c" * 700
    write_raw(tmp_path, db_key(bad.encode()), b"\x02\xbc" + wrong.encode() + encode(rec(7)))
    engine.start()
    with pytest.raises(CorruptRecord):
        engine.get(bad)
    assert [k for k, _ in engine.scan()] == [good], "scan skips it"
    assert await engine.put(bad, rec(1)) is True, "a corrupt record is overwritten"
    assert engine.get(bad) == rec(1)


@pytest.mark.parametrize("key", ["k", "k" * 511, *LONG_KEYS])
def test_stored_value_round_trips_its_key(key: str) -> None:
    kb = key.encode("utf-8")
    dbk = db_key(kb)
    encoded = encode(rec(1))
    assert len(dbk) <= LMDB_MAX_KEY
    assert (dbk == kb) == (len(kb) <= LMDB_MAX_KEY)
    assert unpack_stored(dbk, pack_stored(kb, encoded)) == (kb, encoded)


def test_unpack_refuses_a_long_key_record_that_does_not_match() -> None:
    kb = ("x" * 600).encode()
    stored = pack_stored(kb, encode(rec(1)))
    with pytest.raises(CorruptRecord, match="too short"):
        unpack_stored(db_key(kb), b"\x02")
    with pytest.raises(CorruptRecord, match="does not match its digest"):
        unpack_stored(db_key(("y" * 600).encode()), stored)


def test_hint_keys_group_by_target() -> None:
    target = b"127.0.0.1:8002"
    short, long = hint_key(target, b"a"), hint_key(target, b"x" * 600)
    assert short == target + b"\x00a"
    assert len(long) == len(target) + 1 + 32 and long[len(target)] == 1
    assert is_hint_of(short, target) and is_hint_of(long, target)
    assert not is_hint_of(hint_key(b"127.0.0.1:80021", b"a"), target)
    assert decode_hint(pack_hint(b"x" * 600, encode(rec(2)))) == ("x" * 600, rec(2))
    for bad in (b"", b"a\x00b", b"a\x01b", b"t" * 257):
        assert is_bad_target(bad), bad
    assert not is_bad_target(b"t" * 256)
