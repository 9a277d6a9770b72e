"""The packages' public surface: no I/O libraries in the core, sorted and complete ``__all__``."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

IO_MODULES = ("asyncio", "aiohttp", "httpx", "anyio", "trio", "obstore", "socket")

PROBE = """
import json, sys
before = set(sys.modules)
import rca_core, rca_core.testing
pulled = sorted(set(sys.modules) - before)
print(json.dumps({"before": sorted(before), "pulled": pulled}))
"""

# The core must work with every I/O library unavailable: block them, then run a scenario.
BLOCKED_RUN = """
import sys
BLOCKED = set(sys.argv[1:])

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
import random
from rca_core import MachineSettings, Orchestrator, WorkerMachine
from rca_core.testing import FakeOrchestrator, Simulation

fake = FakeOrchestrator(url="http://o")
settings = MachineSettings(
    worker_id="w", worker_type="t", tasks={"echo": None},
    orchestrators=(Orchestrator(url="http://o", token=fake.token),),
)
sim = Simulation(WorkerMachine(settings, rng=random.Random(1)), [fake],
                 handler=lambda task: (1.0, {"status": "success"}))
sim.run_until(lambda: fake.heartbeats, timeout=5)
task_id = fake.submit("echo")
assert sim.run_until(lambda: fake.results_for(task_id), timeout=5)
print("ok")
"""


def clean_env() -> dict[str, str]:
    """The environment without coverage's subprocess hooks, which import things of their own."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COV_", "COVERAGE", "PYTHONSTARTUP"))
    }


def run_python(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def top(name: str) -> str:
    return name.split(".")[0]


def test_importing_the_core_pulls_in_no_io_library() -> None:
    report = json.loads(run_python(PROBE))
    assert not {top(m) for m in report["before"]} & set(IO_MODULES), "the probe is not clean"
    assert "rca_core" in report["pulled"]
    assert "rca_core.testing" in report["pulled"]
    pulled_io = sorted(m for m in report["pulled"] if top(m) in IO_MODULES)
    assert pulled_io == []


def test_the_core_runs_with_every_io_library_blocked() -> None:
    assert run_python(BLOCKED_RUN, *IO_MODULES).strip() == "ok"


# -- __all__ ----------------------------------------------------------------------------------

MODULES = ["rca_core", "rca_core.testing", "rca_aiohttp", "rca_httpx"]


def isort_key(name: str) -> tuple[int, list[object]]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then everything else; natural sort within."""
    if name.isupper() or (name.upper() == name and any(c.isalpha() for c in name)):
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    parts: list[object] = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
    return group, parts


def defined_names(module: types.ModuleType) -> set[str]:
    """Top-level names a plain module binds itself (def, class, assignment): not its imports."""
    tree = ast.parse(inspect.getsource(module))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def public_names(module: types.ModuleType) -> set[str]:
    if hasattr(module, "__path__"):  # a package: everything its __init__ binds is a re-export
        candidates = {
            name
            for name, value in vars(module).items()
            if not isinstance(value, types.ModuleType) and name != "annotations"
        }
    else:
        candidates = defined_names(module)
    return {name for name in candidates if not name.startswith("_")}


def load(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # an optional adapter, or one not written yet
        pytest.skip(f"{name} is not importable here: {exc}")


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_lists_exactly_the_public_names(name: str) -> None:
    module = load(name)
    exported = getattr(module, "__all__", None)
    found = public_names(module)
    if exported is None and not found:
        pytest.skip(f"{name} is a placeholder with no public names yet")
    assert exported is not None, f"{name} has public names {sorted(found)} but no __all__"
    assert list(exported) == sorted(exported, key=isort_key)
    assert len(set(exported)) == len(exported)
    assert set(exported) == found
    for item in exported:
        assert hasattr(module, item)


@pytest.mark.parametrize("name", ["rca_core", "rca_aiohttp", "rca_httpx"])
def test_every_package_is_typed(name: str) -> None:
    module = load(name)
    assert (Path(module.__file__ or "").parent / "py.typed").is_file()


def test_the_sort_key_is_rufs() -> None:
    names = [
        "state_diagram",
        "Backoff",
        "FAILOVER",
        "Slots",
        "ROUND_ROBIN",
        "backoff_delay",
        "V10",
        "V9",
    ]
    assert sorted(names, key=isort_key) == [
        "FAILOVER",
        "ROUND_ROBIN",
        "V9",
        "V10",
        "Backoff",
        "Slots",
        "backoff_delay",
        "state_diagram",
    ]


def test_events_and_effects_are_frozen_slotted_keyword_only() -> None:
    import dataclasses
    import typing

    import rca_core

    classes = [*typing.get_args(rca_core.Event), *typing.get_args(rca_core.Effect), rca_core.Task]
    assert len(classes) == 10 + 9 + 1
    for cls in classes:
        assert isinstance(cls, type) and dataclasses.is_dataclass(cls), cls
        assert getattr(cls, "__dataclass_params__").frozen, cls  # noqa: B009
        assert "__slots__" in vars(cls), cls
        assert all(f.kw_only for f in dataclasses.fields(cls)), cls
        assert cls.__name__ in rca_core.__all__
