"""Which orchestrator gets the next poll: failover by priority, smooth weighted round robin."""

from __future__ import annotations

import pytest

from rca_core import FAILOVER, ROUND_ROBIN, Candidate, Selector


def cand(
    index: int, *, priority: int = 10, weight: int = 1, healthy: bool = True, available: bool = True
) -> Candidate:
    return Candidate(
        index=index, priority=priority, weight=weight, healthy=healthy, available=available
    )


def picks(selector: Selector, candidates: list[Candidate], n: int) -> list[int | None]:
    return [selector.choose(candidates) for _ in range(n)]


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown mode 'RANDOM'"):
        Selector("RANDOM", 2)


def test_mode_is_reported() -> None:
    assert Selector(FAILOVER, 1).mode == "FAILOVER"
    assert Selector(ROUND_ROBIN, 1).mode == "ROUND_ROBIN"


def test_failover_polls_only_the_best_healthy_priority() -> None:
    selector = Selector(FAILOVER, 3)
    pool = [cand(0, priority=2), cand(1, priority=1), cand(2, priority=3)]
    assert picks(selector, pool, 4) == [1, 1, 1, 1]
    assert [c.index for c in selector.eligible(pool)] == [1]


def test_failover_falls_back_when_the_best_is_unhealthy_and_returns() -> None:
    selector = Selector(FAILOVER, 2)
    primary_down = [cand(0, priority=1, healthy=False), cand(1, priority=2)]
    assert picks(selector, primary_down, 2) == [1, 1]
    back = [cand(0, priority=1), cand(1, priority=2)]
    assert picks(selector, back, 2) == [0, 0]


def test_failover_waits_for_a_healthy_primary_that_is_not_available_yet() -> None:
    selector = Selector(FAILOVER, 2)
    # Healthy but not registered or backing off: no poll at all, rather than the secondary.
    pool = [cand(0, priority=1, available=False), cand(1, priority=2)]
    assert selector.choose(pool) is None


def test_failover_shares_one_priority_level_by_weight() -> None:
    selector = Selector(FAILOVER, 3)
    pool = [cand(0, priority=1, weight=3), cand(1, priority=1, weight=1), cand(2, priority=2)]
    chosen = picks(selector, pool, 8)
    assert chosen.count(0) == 6
    assert chosen.count(1) == 2


def test_when_nobody_is_healthy_everybody_is_probed_again() -> None:
    """All down: each orchestrator's own backoff paces the probes (no wait for a heartbeat)."""
    pool = [cand(0, priority=1, healthy=False), cand(1, priority=2, healthy=False)]
    failover = Selector(FAILOVER, 2)
    assert [c.index for c in failover.eligible(pool)] == [0]  # best priority first
    assert failover.choose(pool) == 0
    round_robin = Selector(ROUND_ROBIN, 2)
    assert [c.index for c in round_robin.eligible(pool)] == [0, 1]
    # Still backing off (not available): nothing to poll yet.
    waiting = [cand(0, healthy=False, available=False), cand(1, healthy=False, available=False)]
    assert failover.choose(waiting) is None
    assert Selector(FAILOVER, 0).choose([]) is None


def test_a_healthy_orchestrator_wins_over_unhealthy_better_ones() -> None:
    pool = [cand(0, priority=1, healthy=False), cand(1, priority=2, healthy=True)]
    assert Selector(FAILOVER, 2).choose(pool) == 1


def test_round_robin_is_smooth_and_weighted() -> None:
    selector = Selector(ROUND_ROBIN, 2)
    pool = [cand(0, priority=1, weight=2), cand(1, priority=5, weight=1)]
    assert picks(selector, pool, 6) == [0, 1, 0, 0, 1, 0]


def test_round_robin_with_weights_5_1_1_interleaves() -> None:
    selector = Selector(ROUND_ROBIN, 3)
    pool = [cand(0, weight=5), cand(1, weight=1), cand(2, weight=1)]
    assert picks(selector, pool, 7) == [0, 0, 1, 0, 2, 0, 0]  # nginx's documented order


def test_round_robin_skips_the_unavailable_and_unhealthy() -> None:
    selector = Selector(ROUND_ROBIN, 3)
    pool = [cand(0), cand(1, available=False), cand(2, healthy=False)]
    assert picks(selector, pool, 3) == [0, 0, 0]
    assert [c.index for c in selector.eligible(pool)] == [0, 1]
