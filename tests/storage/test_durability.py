"""The durability modes, checked in one place."""

from __future__ import annotations

import pytest

from shardkv.storage.durability import DURABILITY_MODES, check_durability


def test_modes() -> None:
    assert DURABILITY_MODES == ("always", "batch", "os")


@pytest.mark.parametrize("mode", ["always", "batch", "os"])
def test_known_modes_pass(mode: str) -> None:
    assert check_durability(mode) == mode


@pytest.mark.parametrize("mode", ["sometimes", "", "Always", " always"])
def test_unknown_modes_are_refused_with_the_choices(mode: str) -> None:
    with pytest.raises(ValueError) as info:
        check_durability(mode)
    assert str(info.value) == f"unknown durability {mode!r}; use one of always, batch, os"
