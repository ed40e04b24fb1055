"""Key rules shared by every entry point.

Keys arrive as JSON strings (``/set``), query arguments (``/get?key=``) or
percent-encoded path segments (``/kv/{key}``). All of them end up here so that
a key accepted by one route is accepted by every other route and by every node.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from shardkv.errors import InvalidRequest

MAX_KEY_BYTES = 1024


class InvalidKey(InvalidRequest):
    """A key that no route may store."""

    code = "invalid_key"


class KeyTooLong(InvalidKey):
    code = "key_too_long"


def check_key(key: str) -> str:
    """Return ``key`` if it is storable, else raise L{InvalidKey}.

    Keys are limited in bytes, not characters, because that is what nodes
    store and what the hash ring sees.
    """
    if key == "":
        raise InvalidKey("the key is empty")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("the key is not valid UTF-8 (it contains a lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise KeyTooLong(f"the key is {size} bytes; the limit is {MAX_KEY_BYTES}")
    return key


def key_from_bytes(raw: bytes) -> str:
    """Decode a key given as bytes (a query argument) and check it."""
    if len(raw) > MAX_KEY_BYTES:
        raise KeyTooLong(f"the key is {len(raw)} bytes; the limit is {MAX_KEY_BYTES}")
    try:
        return check_key(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidKey("the key is not valid UTF-8") from None


def key_from_path(segment: bytes) -> str:
    """Decode a percent-encoded path segment into a key.

    ``/kv/a%2Fb`` names the key ``a/b``; the raw path is used so that the
    key a client encoded is exactly the key that is stored.
    """
    return key_from_bytes(unquote_to_bytes(segment))
