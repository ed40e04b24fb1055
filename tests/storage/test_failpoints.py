"""Failpoints: the spec parser and how often each fires."""

from __future__ import annotations

import pytest

from shardkv.storage.failpoints import Failpoints


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
