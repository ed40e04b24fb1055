"""Fixtures for the storage tests.

They use the real global reactor through pytest-twisted; every engine is
stopped in fixture teardown so no commit thread outlives its test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted

from shardkv.storage.failpoints import Failpoints
from shardkv.storage.lmdb.engine import LMDBEngine
from tests.storage.helpers import MakeLMDB, reactor


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
