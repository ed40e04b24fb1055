"""A node's window: a target's worth of the throughput its answers show."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkv.core.window import (
    FLOOR_FRACTION,
    LOAD_FRACTION,
    RATE_WEIGHT,
    START_FRACTION,
    ByteWindow,
    Room,
)

CAP = 64_000
TARGET = 0.5
FLOOR = CAP // FLOOR_FRACTION


def test_a_new_window_starts_at_an_eighth_of_the_cap() -> None:
    w = ByteWindow(CAP, TARGET)
    assert (w.limit, w.used, w.floor, w.rate) == (CAP // START_FRACTION, 0, FLOOR, None)


def test_room_is_free_in_the_window_and_an_idle_node_takes_any_size() -> None:
    w = ByteWindow(CAP, TARGET)
    assert w.room(10 * CAP) is Room.FREE
    w.take(w.limit - 100)
    assert w.room(100) is Room.FREE
    assert w.room(101) is Room.WINDOW_FULL
    assert w.room(CAP - w.used) is Room.WINDOW_FULL
    assert w.room(CAP - w.used + 1) is Room.CAP_FULL


def test_an_answer_sizes_the_window_to_a_target_of_the_throughput_it_shows() -> None:
    """8,000 bytes in flight answered in 0.1 s: 80,000 B/s, so 40,000 bytes in 0.5 s."""
    w = ByteWindow(CAP, TARGET)
    in_flight = w.take(8_000)
    w.answered(8_000, in_flight, started=0.0, now=0.1)
    assert w.rate == pytest.approx(80_000)
    assert (w.limit, w.used) == (40_000, 0)


def test_the_estimate_moves_a_weighted_step_toward_each_sample() -> None:
    w = ByteWindow(CAP, TARGET)
    w.answered(0, 8_000, 0.0, 0.1)  # 80,000 B/s
    w.answered(0, 8_000, 0.0, 0.4)  # 20,000 B/s
    rate = 80_000 + RATE_WEIGHT * (20_000 - 80_000)
    assert w.rate == pytest.approx(rate)
    assert w.limit == pytest.approx(rate * TARGET, abs=1)


def test_a_slow_node_gets_the_floor_and_a_fast_one_the_cap() -> None:
    w = ByteWindow(CAP, TARGET)
    for _ in range(20):
        w.answered(0, FLOOR, 0.0, 10.0)
    assert w.limit == FLOOR
    for _ in range(20):
        w.answered(0, CAP, 0.0, 0.01)
    assert w.limit == CAP


def test_a_write_sent_with_little_in_flight_says_nothing_of_throughput() -> None:
    """A lone small write measures the node's fixed costs, not its throughput."""
    w = ByteWindow(CAP, TARGET)
    small = int(FLOOR * LOAD_FRACTION) - 1
    w.take(small)
    w.answered(small, small, 0.0, 1.0)
    assert (w.rate, w.limit, w.used) == (None, CAP // START_FRACTION, 0)


def test_a_release_says_nothing_of_speed() -> None:
    w = ByteWindow(CAP, TARGET)
    w.take(FLOOR)
    w.release(FLOOR)
    assert (w.rate, w.limit, w.used) == (None, CAP // START_FRACTION, 0)


def test_an_answer_on_a_clock_that_did_not_move_is_not_infinitely_fast() -> None:
    w = ByteWindow(CAP, TARGET)
    w.answered(0, FLOOR, 5.0, 5.0)
    assert w.rate == pytest.approx(FLOOR / 1e-3)


def test_resize_opens_the_window_to_the_new_cap_and_keeps_what_is_in_flight() -> None:
    w = ByteWindow(CAP, TARGET)
    w.take(300)
    w.resize(ceiling=400, target=2.0)
    assert (w.limit, w.ceiling, w.floor, w.target, w.used) == (400, 400, 25, 2.0, 300)


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2 * CAP),
            st.floats(min_value=0, max_value=5.0),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_any_history_keeps_the_window_in_bounds_and_the_count_exact(
    history: list[tuple[int, float, bool]],
) -> None:
    """Whatever the answers, the limit stays in [floor, cap], ``used`` is what
    was taken and not yet ended, and what is admitted fits the window."""
    w = ByteWindow(CAP, TARGET)
    clock = 0.0
    for size, seconds, learn in history:
        if w.room(size) is Room.FREE:
            assert w.used == 0 or w.used + size <= w.limit
            in_flight = w.take(size)
            assert in_flight == w.used
            if learn:
                w.answered(size, in_flight, clock, clock + seconds)
            else:
                w.release(size)
            clock += seconds
        assert w.floor <= w.limit <= w.ceiling
        assert w.used == 0
