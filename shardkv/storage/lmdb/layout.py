"""How records and hints are laid out in LMDB, and the changes made inside write transactions.

Keys: any key the API accepts (up to 1 KiB of UTF-8,
L{shardkv.core.keys.MAX_KEY_BYTES}) is stored, although LMDB's compiled-in key
limit is 511 bytes. A key of at most 511 bytes is its own LMDB key. A longer
one is stored under ``key[:478] + 0xFF + sha256(key)`` (511 bytes), and its
record's value starts with the real key (2-byte length, then the UTF-8), so
the engine's ``scan`` can return it. 0xFF never occurs in UTF-8, so such an LMDB
key cannot be a short key; reading one back checks the sha256 against the key
it holds, which covers the embedded key as the CRC covers the record. Scan
order is the LMDB key order: byte order of the UTF-8, except that a long key
sorts after every shorter key that shares its first 478 bytes, and long keys
sharing those bytes sort by digest. ``scan(start=<last key returned>)`` seeks
to that key's own position, so paginating by the last key returned visits
every record once.

Records live in sub-database ``records``, under L{db_key} of their key. Hints
for down nodes live apart, in ``hints``, under ``target + 0x00 + key`` so that
one target's hints are contiguous and in key order. When that is longer than
LMDB's key limit (511 bytes) it is ``target + 0x01 + sha256(key)`` instead;
such hints come after the target's others. The hint's value holds the real key
either way.

Metadata (``put_meta``/``get_meta``: the node's cluster map and acceptor
state) lives in ``meta`` beside the storage format, under ``b"m:" + name``:
the prefix keeps a name from ever replacing ``format`` or the committer's
``last_bump``.

The ``apply_*`` functions run in the committer thread inside a group's write
transaction (see L{shardkv.storage.lmdb.committer.WriteOp}); each keeps the
newer-only rule, and a stored record that fails to decode never blocks a write.
"""

from __future__ import annotations

import hashlib
import struct

import lmdb

from shardkv.core.records import CorruptRecord, Record, decode
from shardkv.core.versions import Version

RECORDS_DB = "records"
HINTS_DB = "hints"
META_DB = "meta"
FORMAT = b"1"
"""The storage format this version reads and writes, kept in ``meta``."""

LMDB_MAX_KEY = 511
"""The longest LMDB key (LMDB's compiled-in ``MDB_MAXKEYSIZE`` default); the
layout of long keys depends on it, so an LMDB built with less is refused."""
_LONG_MARK = 0xFF
_DIGEST_BYTES = hashlib.sha256().digest_size
LONG_KEY_PREFIX = LMDB_MAX_KEY - 1 - _DIGEST_BYTES
"""How many leading bytes of a long key its LMDB key keeps (478)."""

_META_PREFIX = b"m:"
MAX_META_NAME_BYTES = 200

_KEY_HEAD = struct.Struct(">H")
MAX_STORED_KEY_BYTES = 2**16 - 1
"""The longest UTF-8 key the 2-byte length in front of an embedded key can hold."""
_DIRECT, _HASHED = b"\x00", b"\x01"
MAX_TARGET_BYTES = 256


# -- records ---------------------------------------------------------------------


def db_key(kb: bytes) -> bytes:
    """The LMDB key of the record for UTF-8 key ``kb`` (see the module docstring)."""
    if len(kb) <= LMDB_MAX_KEY:
        return kb
    return kb[:LONG_KEY_PREFIX] + bytes([_LONG_MARK]) + hashlib.sha256(kb).digest()


def _is_long(dbk: bytes) -> bool:
    return len(dbk) == LMDB_MAX_KEY and dbk[LONG_KEY_PREFIX] == _LONG_MARK


def pack_stored(kb: bytes, encoded: bytes) -> bytes:
    """The LMDB value for encoded record ``encoded`` of UTF-8 key ``kb``."""
    if len(kb) <= LMDB_MAX_KEY:
        return encoded
    return _KEY_HEAD.pack(len(kb)) + kb + encoded


def unpack_stored(dbk: bytes, raw: bytes) -> tuple[bytes, bytes]:
    """The UTF-8 key and the encoded record kept under LMDB key ``dbk``."""
    if not _is_long(dbk):
        return dbk, raw
    if len(raw) < _KEY_HEAD.size:
        raise CorruptRecord("long-key record too short")
    (n,) = _KEY_HEAD.unpack_from(raw)
    kb = raw[_KEY_HEAD.size : _KEY_HEAD.size + n]
    if len(kb) != n or db_key(kb) != dbk:
        raise CorruptRecord("the key stored with a long-key record does not match its digest")
    return kb, raw[_KEY_HEAD.size + n :]


def _decode_stored(dbk: bytes, raw: bytes) -> Record:
    return decode(unpack_stored(dbk, raw)[1])


# -- metadata --------------------------------------------------------------------


def meta_key(name: str) -> bytes:
    """The LMDB key in ``meta`` of metadata ``name``; ValueError for an unusable name."""
    nb = name.encode("utf-8")
    if not nb or len(nb) > MAX_META_NAME_BYTES:
        raise ValueError(f"a metadata name must be 1 to {MAX_META_NAME_BYTES} bytes: {name!r}")
    return _META_PREFIX + nb


def apply_put_meta(
    mk: bytes, value: bytes, txn: lmdb.Transaction[bytes], db: lmdb._Database
) -> None:
    txn.put(mk, value, db=db)


# -- hints -----------------------------------------------------------------------


def is_bad_target(tb: bytes) -> bool:
    """Whether UTF-8 node name ``tb`` cannot be a hint key's prefix."""
    return not tb or len(tb) > MAX_TARGET_BYTES or b"\x00" in tb or b"\x01" in tb


def hint_key(tb: bytes, kb: bytes) -> bytes:
    """The LMDB key of the hint for target ``tb`` (not L{is_bad_target}) and key ``kb``."""
    direct = tb + _DIRECT + kb
    if len(direct) <= LMDB_MAX_KEY:
        return direct
    return tb + _HASHED + hashlib.sha256(kb).digest()


def first_hint_key(tb: bytes) -> bytes:
    """Where target ``tb``'s hints begin in LMDB key order."""
    return tb + _DIRECT


def is_hint_of(hk: bytes, tb: bytes) -> bool:
    """Whether LMDB key ``hk`` is one of target ``tb``'s hints."""
    return hk[: len(tb)] == tb and hk[len(tb) : len(tb) + 1] in (_DIRECT, _HASHED)


def pack_hint(kb: bytes, encoded: bytes) -> bytes:
    """The LMDB value of a hint: the key (2-byte length, then the UTF-8), then the record."""
    return _KEY_HEAD.pack(len(kb)) + kb + encoded


def decode_hint(raw: bytes) -> tuple[str, Record]:
    """The key and record of a hint's LMDB value."""
    if len(raw) < _KEY_HEAD.size:
        raise CorruptRecord("hint too short")
    (n,) = _KEY_HEAD.unpack_from(raw)
    start = _KEY_HEAD.size
    return raw[start : start + n].decode("utf-8"), decode(raw[start + n :])


def count_hints(env: lmdb.Environment, db: lmdb._Database) -> dict[str, int]:
    """How many hints each target has in ``db``, read once at start-up."""
    counts: dict[str, int] = {}
    with env.begin(db=db) as txn:
        for hk in txn.cursor().iternext(values=False):
            cut = min((i for i in (hk.find(_DIRECT), hk.find(_HASHED)) if i > 0), default=-1)
            if cut > 0:
                target = hk[:cut].decode("utf-8", "replace")
                counts[target] = counts.get(target, 0) + 1
    return counts


# -- changes, run inside a write transaction --------------------------------------


def apply_put(
    dbk: bytes, value: bytes, version: Version, txn: lmdb.Transaction[bytes], db: lmdb._Database
) -> bool:
    current = txn.get(dbk, db=db)
    if current is not None:
        try:
            if _decode_stored(dbk, current).version >= version:
                return False
        except CorruptRecord:
            pass
    txn.put(dbk, value, db=db)
    return True


def apply_discard(
    dbk: bytes,
    version: Version,
    tombstone_only: bool,
    txn: lmdb.Transaction[bytes],
    db: lmdb._Database,
) -> bool:
    """Delete the record under ``dbk`` if it holds exactly ``version`` (and, with
    ``tombstone_only``, is a tombstone): a newer write since is never lost."""
    current = txn.get(dbk, db=db)
    if current is None:
        return False
    try:
        stored = _decode_stored(dbk, current)
    except CorruptRecord:
        return False
    if stored.version != version or (tombstone_only and not stored.tombstone):
        return False
    return txn.delete(dbk, db=db)


def apply_put_hint(
    hk: bytes, value: bytes, version: Version, txn: lmdb.Transaction[bytes], db: lmdb._Database
) -> tuple[bool, int]:
    """Whether the hint was stored, and by how much the target's hint count changed."""
    current = txn.get(hk, db=db)
    if current is not None:
        try:
            if decode_hint(current)[1].version >= version:
                return False, 0
        except (CorruptRecord, UnicodeDecodeError):
            pass
    txn.put(hk, value, db=db)
    return True, 0 if current is not None else 1


def apply_remove_hint(
    hk: bytes, version: Version, txn: lmdb.Transaction[bytes], db: lmdb._Database
) -> tuple[bool, int]:
    """Whether the hint was removed, and by how much the target's hint count changed."""
    current = txn.get(hk, db=db)
    if current is None:
        return False, 0
    try:
        if decode_hint(current)[1].version != version:
            return False, 0
    except (CorruptRecord, UnicodeDecodeError):
        return False, 0
    txn.delete(hk, db=db)
    return True, -1


def apply_drop_hints(
    tb: bytes, limit: int, txn: lmdb.Transaction[bytes], db: lmdb._Database
) -> int:
    """Delete up to ``limit`` of target ``tb``'s hints; how many were deleted.

    Bounded so that one target with millions of hints cannot make a write
    transaction too large; the engine repeats until fewer than ``limit`` go.
    """
    cursor = txn.cursor(db=db)
    deleted = 0
    found = cursor.set_range(first_hint_key(tb))
    while found and deleted < limit and is_hint_of(cursor.key(), tb):
        found = cursor.delete()
        deleted += 1
    return deleted
