"""The in-memory engine: what the contract (test_engine) does not cover."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from shardkv.storage.memory import MemoryEngine
from tests.storage.helpers import model, record_for, result_of, versions


@given(versions, st.randoms(use_true_random=False))
def test_property_memory_converges(ops: list[tuple[int, int, str]], rnd: Any) -> None:
    shuffled = list(ops)
    rnd.shuffle(shuffled)
    finals = []
    for order in (ops, shuffled):
        engine = MemoryEngine()
        results = [result_of(engine.put("k", record_for(t))) for t in order]
        assert results == model(order)
        finals.append(engine.get("k"))
    assert finals[0] == finals[1] == record_for(max(ops))
