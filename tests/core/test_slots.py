"""Slot accounting: global reservations for polls, held tasks, per-type running and waiting."""

from __future__ import annotations

import pytest

from rca_core import SlotError, Slots


def test_polls_reserve_global_slots_and_tasks_keep_them() -> None:
    slots = Slots(limit=2, type_limits={})
    assert slots.free == 2
    assert slots.reserve_for_poll()
    assert slots.reserve_for_poll()
    assert not slots.reserve_for_poll()
    assert slots.free == 0
    slots.poll_got_task()
    slots.poll_empty()
    assert (slots.polling, slots.held, slots.free) == (0, 1, 1)
    slots.release()
    assert slots.free == 2


def test_releasing_what_was_never_taken_is_an_error() -> None:
    slots = Slots(limit=1, type_limits={"gpu": 1})
    with pytest.raises(SlotError, match="poll reservation"):
        slots.poll_empty()
    with pytest.raises(SlotError, match="without a reservation"):
        slots.poll_got_task()
    with pytest.raises(SlotError, match="task slot"):
        slots.release()
    with pytest.raises(SlotError, match="was waiting"):
        slots.unwait("gpu")
    with pytest.raises(SlotError, match="was running"):
        slots.stop("gpu")
    assert slots.snapshot() == {
        "limit": 1,
        "polling": 0,
        "held": 0,
        "running": {"gpu": 0},
        "waiting": {"gpu": 0},
    }


def test_a_type_at_its_limit_refuses_to_start_another() -> None:
    slots = Slots(limit=5, type_limits={"gpu": 2})
    slots.start("gpu")
    assert not slots.type_full("gpu")
    slots.start("gpu")
    assert slots.type_full("gpu")
    with pytest.raises(SlotError, match="at its limit"):
        slots.start("gpu")
    slots.stop("gpu")
    assert not slots.type_full("gpu")
    assert slots.running == {"gpu": 1}


def test_waiting_tasks_count_against_what_the_type_accepts() -> None:
    slots = Slots(limit=5, type_limits={"gpu": 2})
    assert slots.type_accepting("gpu")
    slots.start("gpu")
    slots.wait("gpu")
    assert not slots.type_accepting("gpu")
    assert not slots.type_full("gpu")  # one more could start, but one is already waiting
    slots.unwait("gpu")
    assert slots.type_accepting("gpu")
    assert slots.waiting == {"gpu": 0}


@pytest.mark.parametrize("task_type", [None, "unlimited"])
def test_types_without_a_limit_are_never_full(task_type: str | None) -> None:
    slots = Slots(limit=1, type_limits={"gpu": 1})
    for _ in range(3):
        slots.start(task_type)
        slots.wait(task_type)
    assert not slots.type_full(task_type)
    assert slots.type_accepting(task_type)
    slots.unwait(task_type)
    slots.stop(task_type)
    assert slots.snapshot()["running"] == {"gpu": 0}
    assert slots.snapshot()["waiting"] == {"gpu": 0}
