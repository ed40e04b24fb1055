"""Tests for L{shardkv.web.descriptors}: the open-file limit fits the connection caps."""

from __future__ import annotations

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from shardkv.web.descriptors import DescriptorBudget
from tests.web.test_site import Capture


def test_descriptor_budget_raises_the_soft_limit() -> None:
    """
    If the soft open-file limit is 1024 and the hard one 65536, then a site
    with a cap of 1024 raises the soft limit to fit it plus headroom and gets
    all 1024; a second site (a cluster) raises it again; releasing gives the
    room back without lowering the limit.
    """
    limits = {"soft": 1024, "hard": 65536}
    calls: list[tuple[int, int]] = []

    def set_limit(which: int, value: tuple[int, int]) -> None:
        calls.append(value)
        limits["soft"] = value[0]

    budget = DescriptorBudget(lambda which: (limits["soft"], limits["hard"]), set_limit)
    assert budget.reserve(1024, 64) == 1024
    assert calls == [(DescriptorBudget.BASE + 1024 + 64, 65536)]
    assert budget.reserve(1024, 200) == 1024
    assert limits["soft"] == DescriptorBudget.BASE + 2 * 1024 + 64 + 200
    budget.release(1024, 200)
    assert budget.reserve(1024, 200) == 1024
    assert len(calls) == 2, "a reservation that fits raised the limit again"


@pytest.mark.parametrize("refuse", [False, True], ids=["hard-limit", "setrlimit-fails"])
def test_descriptor_budget_lowers_the_cap_when_the_limit_cannot_rise(refuse: bool) -> None:
    """
    If the hard open-file limit is 512 (or raising the soft one fails), then
    a site asking for 1024 connections gets what fits under the limit, and
    one warning says how many and how to raise the limit.
    """
    soft, hard = (512, 512) if not refuse else (512, 65536)

    def set_limit(which: int, value: tuple[int, int]) -> None:
        if refuse:
            raise ValueError("not allowed")

    capture = Capture()
    globalLogPublisher.addObserver(capture)
    try:
        granted = DescriptorBudget(lambda which: (soft, hard), set_limit).reserve(1024, 64)
    finally:
        globalLogPublisher.removeObserver(capture)
    assert granted == 512 - DescriptorBudget.BASE - 64
    warnings = [formatEvent(e) for e in capture.events if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1, warnings
    assert f"fits {granted} connections" in warnings[0]
    assert "ulimit -n" in warnings[0]
