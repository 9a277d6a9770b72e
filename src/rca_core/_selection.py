"""Which orchestrator gets the next long poll.

``FAILOVER``: only the healthy orchestrators with the best (lowest) priority
are polled; several at that priority share the polls by weight. When they all
fail the next priority takes over, and the first successful register or
heartbeat of a better one brings the polls back up.

``ROUND_ROBIN``: every healthy orchestrator is polled, in proportion to its
weight, by smooth weighted round robin (the nginx algorithm): the order is
deterministic and interleaved (weights 2:1 give A B A, not A A B).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FAILOVER", "ROUND_ROBIN", "Candidate", "Selector"]

FAILOVER = "FAILOVER"
ROUND_ROBIN = "ROUND_ROBIN"


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """An orchestrator as the selector sees it."""

    index: int
    priority: int
    weight: int
    healthy: bool
    available: bool  # registered and not backing off: a poll could go out now


class Selector:
    """Smooth weighted round robin with a failover filter in front of it."""

    def __init__(self, mode: str, count: int) -> None:
        if mode not in (FAILOVER, ROUND_ROBIN):
            raise ValueError(f"unknown mode {mode!r}")
        self._mode = mode
        self._current = [0] * count

    @property
    def mode(self) -> str:
        return self._mode

    def eligible(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The orchestrators that may be polled at all in the current health picture."""
        # When none is healthy, every one is a candidate again: its own backoff
        # paces the probes, and a lone orchestrator must not wait for a heartbeat
        # to be polled after one failed poll.
        pool = [c for c in candidates if c.healthy] or list(candidates)
        if self._mode == FAILOVER and pool:
            best = min(c.priority for c in pool)
            pool = [c for c in pool if c.priority == best]
        return pool

    def choose(self, candidates: Sequence[Candidate]) -> int | None:
        """The index to poll next, or None when no eligible orchestrator is available now."""
        if len(candidates) == 1:  # one orchestrator: what the general case below decides
            only = candidates[0]
            return only.index if only.healthy and only.available else None
        pool = [c for c in self.eligible(candidates) if c.available]
        if not pool:
            return None
        total = 0
        best: Candidate | None = None
        for c in pool:
            self._current[c.index] += c.weight
            total += c.weight
            if best is None or self._current[c.index] > self._current[best.index]:
                best = c
        assert best is not None
        self._current[best.index] -= total
        return best.index
