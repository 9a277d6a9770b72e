"""Slot accounting: how many tasks may run, globally and per task type.

A global slot is reserved *before* a long poll goes out (so the worker never
receives more tasks than it can hold) and is released exactly once: when the
poll comes back empty, or when the task it brought finishes. A task whose
type is at its limit holds its global slot and waits for a type slot; it is
never run beyond the limit.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["SlotError", "Slots"]


class SlotError(RuntimeError):
    """A slot was released that was never taken: a bug in the caller."""


class Slots:
    def __init__(self, *, limit: int, type_limits: Mapping[str, int]) -> None:
        self.limit = limit
        self.type_limits = dict(type_limits)
        self.polling = 0  # reserved for polls in flight
        self.held = 0  # tasks received and not finished (waiting or running)
        self.running: dict[str, int] = dict.fromkeys(self.type_limits, 0)
        self.waiting: dict[str, int] = dict.fromkeys(self.type_limits, 0)

    # -- global --------------------------------------------------------------------

    @property
    def free(self) -> int:
        """Global slots neither reserved by a poll nor held by a task."""
        return self.limit - self.polling - self.held

    def reserve_for_poll(self) -> bool:
        if self.free <= 0:
            return False
        self.polling += 1
        return True

    def poll_empty(self) -> None:
        if self.polling <= 0:
            raise SlotError("released a poll reservation that was not taken")
        self.polling -= 1

    def poll_got_task(self) -> None:
        """The reservation becomes a held slot: the task now owns it."""
        if self.polling <= 0:
            raise SlotError("a poll delivered a task without a reservation")
        self.polling -= 1
        self.held += 1

    # -- per type ------------------------------------------------------------------

    def type_full(self, task_type: str | None) -> bool:
        if task_type is None or task_type not in self.type_limits:
            return False
        return self.running[task_type] >= self.type_limits[task_type]

    def type_accepting(self, task_type: str | None) -> bool:
        """Whether the orchestrator should be told this type is acceptable now."""
        if task_type is None or task_type not in self.type_limits:
            return True
        busy = self.running[task_type] + self.waiting[task_type]
        return busy < self.type_limits[task_type]

    def wait(self, task_type: str | None) -> None:
        if task_type in self.waiting:
            self.waiting[task_type] += 1

    def unwait(self, task_type: str | None) -> None:
        if task_type in self.waiting:
            if self.waiting[task_type] <= 0:
                raise SlotError(f"no task of type {task_type!r} was waiting")
            self.waiting[task_type] -= 1

    def start(self, task_type: str | None) -> None:
        if self.type_full(task_type):
            raise SlotError(f"type {task_type!r} is at its limit")
        if task_type in self.running:
            self.running[task_type] += 1

    def stop(self, task_type: str | None) -> None:
        """A started task finished: its type slot is free again."""
        if task_type in self.running:
            if self.running[task_type] <= 0:
                raise SlotError(f"no task of type {task_type!r} was running")
            self.running[task_type] -= 1

    def release(self) -> None:
        """A held task is gone (finished, rejected or cancelled before it started)."""
        if self.held <= 0:
            raise SlotError("released a task slot that was not held")
        self.held -= 1

    def snapshot(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "polling": self.polling,
            "held": self.held,
            "running": dict(self.running),
            "waiting": dict(self.waiting),
        }
