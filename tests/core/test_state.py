"""The transition tables: every (state, input) pair either moves or raises."""

from __future__ import annotations

import itertools

import pytest

from rca_core import LinkState, LocalProtocolError, WorkerState, state_diagram
from rca_core._state import (
    LINK_TRANSITIONS,
    WORKER_TRANSITIONS,
    LinkInput,
    WorkerInput,
    link_transition,
    worker_transition,
)


@pytest.mark.parametrize(("state", "event"), list(itertools.product(WorkerState, WorkerInput)))
def test_every_worker_pair_is_in_the_table_or_raises(
    state: WorkerState, event: WorkerInput
) -> None:
    if (state, event) in WORKER_TRANSITIONS:
        assert worker_transition(state, event) is WORKER_TRANSITIONS[state, event]
    else:
        with pytest.raises(LocalProtocolError, match=f"worker: no transition from {state.value}"):
            worker_transition(state, event)


@pytest.mark.parametrize(("state", "event"), list(itertools.product(LinkState, LinkInput)))
def test_every_link_pair_is_in_the_table_or_raises(state: LinkState, event: LinkInput) -> None:
    if (state, event) in LINK_TRANSITIONS:
        assert link_transition(state, event) is LINK_TRANSITIONS[state, event]
    else:
        with pytest.raises(LocalProtocolError, match=f"link: no transition from {state.value}"):
            link_transition(state, event)


def test_the_lifecycle_the_docs_promise() -> None:
    s = WorkerState.CREATED
    for event, expected in [
        (WorkerInput.START, WorkerState.RUNNING),
        (WorkerInput.DRAIN, WorkerState.DRAINING),
        (WorkerInput.DRAIN, WorkerState.CANCELLING),
        (WorkerInput.DRAIN, WorkerState.CANCELLING),
        (WorkerInput.GIVE_UP, WorkerState.STOPPED),
        (WorkerInput.DRAIN, WorkerState.STOPPED),
    ]:
        s = worker_transition(s, event)
        assert s is expected
    # Every state but STOPPED can reach STOPPED; STOPPED is the end.
    reachable = {WorkerState.STOPPED}
    changed = True
    while changed:
        changed = False
        for (src, _), dst in WORKER_TRANSITIONS.items():
            if dst in reachable and src not in reachable:
                reachable.add(src)
                changed = True
    assert reachable == set(WorkerState)
    assert {dst for (src, _), dst in WORKER_TRANSITIONS.items() if src is WorkerState.STOPPED} == {
        WorkerState.STOPPED
    }


def test_state_diagram_draws_both_tables_as_mermaid() -> None:
    text = state_diagram()
    lines = text.splitlines()
    assert text.endswith("\n")
    assert lines[0] == "stateDiagram-v2"
    assert lines[1] == "    state Worker {"
    assert "        [*] --> CREATED" in lines
    assert "        STOPPED --> [*]" in lines
    assert "    state Link {" in lines
    assert "        [*] --> UNREGISTERED" in lines
    for (src, event), dst in WORKER_TRANSITIONS.items():
        assert f"        {src.name} --> {dst.name}: {event.value}" in lines
    for (lsrc, levent), ldst in LINK_TRANSITIONS.items():
        assert f"        {lsrc.name} --> {ldst.name}: {levent.value}" in lines
    transitions = [line for line in lines if "-->" in line and "[*]" not in line]
    assert len(transitions) == len(WORKER_TRANSITIONS) + len(LINK_TRANSITIONS)
    assert lines.count("    }") == 2
    assert "        RUNNING --> DRAINING: drain" in lines
