"""Retry delays: exponential growth, full jitter, a cap, and ``Retry-After``.

Full jitter (a uniform draw between zero and the exponential ceiling) spreads a
fleet of workers that lost the same orchestrator at the same moment, so that
they do not come back as a synchronized storm. The randomness is injected so
that tests can replay a run exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff", "backoff_delay"]

#: A server's ``Retry-After`` is honoured, up to this many seconds: a hostile or
#: buggy value must not park the worker for a day.
RETRY_AFTER_LIMIT = 300.0


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    rng: random.Random,
    retry_after: float | None = None,
) -> float:
    """The delay before retry number ``attempt`` (0 for the first retry).

    Always within ``[0, max(cap, min(retry_after, RETRY_AFTER_LIMIT))]``.
    """
    exponent = min(max(attempt, 0), 60)  # 2**60 * base is past any cap already
    ceiling = min(cap, base * (2.0**exponent))
    delay = rng.uniform(0.0, max(ceiling, 0.0))
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_LIMIT))
    return delay


@dataclass(kw_only=True, slots=True)
class Backoff:
    """The retry state of one activity: how many failures in a row, and until when to wait."""

    base: float
    cap: float
    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float, rng: random.Random, retry_after: float | None = None) -> float:
        """Record a failure; returns the delay chosen."""
        delay = backoff_delay(
            self.failures, base=self.base, cap=self.cap, rng=rng, retry_after=retry_after
        )
        self.failures += 1
        self.not_before = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.not_before
