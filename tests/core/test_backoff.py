"""Retry delays: exponential ceiling, full jitter, a cap, and Retry-After (bounded)."""

from __future__ import annotations

import random

import pytest

from rca_core import Backoff, backoff_delay


class Fixed(random.Random):
    """A 'random' source that always draws the top (or bottom) of the range."""

    def __init__(self, top: bool) -> None:
        super().__init__(0)
        self.top = top

    def uniform(self, a: float, b: float) -> float:
        return b if self.top else a


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(-3, 0.5), (0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (60, 5.0), (10**9, 5.0)],
)
def test_the_ceiling_doubles_per_attempt_up_to_the_cap(attempt: int, ceiling: float) -> None:
    assert backoff_delay(attempt, base=0.5, cap=5.0, rng=Fixed(top=True)) == ceiling
    assert backoff_delay(attempt, base=0.5, cap=5.0, rng=Fixed(top=False)) == 0.0


def test_full_jitter_spreads_delays_over_the_whole_range() -> None:
    rng = random.Random(42)
    delays = [backoff_delay(10, base=1.0, cap=8.0, rng=rng) for _ in range(2000)]
    assert 0.0 <= min(delays) < 0.1
    assert 7.9 < max(delays) <= 8.0
    assert 3.5 < sum(delays) / len(delays) < 4.5


def test_retry_after_is_a_floor_bounded_to_five_minutes() -> None:
    low = Fixed(top=False)
    assert backoff_delay(0, base=0.5, cap=5.0, rng=low, retry_after=7.0) == 7.0
    assert backoff_delay(0, base=0.5, cap=5.0, rng=low, retry_after=86_400.0) == 300.0
    assert backoff_delay(0, base=0.5, cap=5.0, rng=low, retry_after=float("inf")) == 300.0
    high = Fixed(top=True)
    assert backoff_delay(5, base=1.0, cap=30.0, rng=high, retry_after=2.0) == 30.0
    assert backoff_delay(0, base=1.0, cap=30.0, rng=high, retry_after=0.0) == 1.0


def test_a_negative_cap_or_base_never_gives_a_negative_delay() -> None:
    rng = Fixed(top=True)
    assert backoff_delay(3, base=-1.0, cap=5.0, rng=rng) == 0.0
    assert backoff_delay(3, base=1.0, cap=-5.0, rng=rng) == 0.0


def test_the_same_seed_replays_the_same_delays() -> None:
    a = [backoff_delay(k, base=0.5, cap=5.0, rng=random.Random(7)) for k in range(10)]
    b = [backoff_delay(k, base=0.5, cap=5.0, rng=random.Random(7)) for k in range(10)]
    assert a == b


def test_backoff_state_counts_failures_and_waits_until_not_before() -> None:
    backoff = Backoff(base=1.0, cap=10.0)
    assert backoff.ready(0.0)
    rng = Fixed(top=True)
    assert backoff.failed(100.0, rng) == 1.0
    assert backoff.failed(101.0, rng) == 2.0
    assert backoff.failed(103.0, rng, retry_after=9.0) == 9.0
    assert (backoff.failures, backoff.not_before) == (3, 112.0)
    assert not backoff.ready(111.9)
    assert backoff.ready(112.0)
    backoff.succeeded()
    assert (backoff.failures, backoff.not_before) == (0, 0.0)
    assert backoff.ready(0.0)
