"""Every Python example of the reference SDK's README runs on rca_aiohttp, import renamed.

The README (``../shared/spec/reference-sdk-README.md``) is the user-facing contract:
each complete program is executed as a module, each snippet is executed inside a
small frame that supplies what it assumes (a ``worker``, an enclosing function),
and the complete programs' handlers are run end to end against the embedded
orchestrator over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import re
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "shared" / "spec" / "reference-sdk-README.md"

ENV = {
    "ORCHESTRATOR_URL": "http://127.0.0.1:9",
    "WORKER_TOKEN": "t",
    "WORKER_ID": "readme-worker",
}


def blocks() -> list[str]:
    if not README.is_file():
        pytest.fail(f"the reference README is expected at {README} (shared/ beside the clone)")
    text = README.read_text()
    return [
        textwrap.dedent(b).replace("avtomatika_worker", "rca_aiohttp")
        for b in re.findall(r"```python\n(.*?)```", text, re.S)
    ]


def is_program(code: str) -> bool:
    return "Worker(" in code and "import" in code


def run_module(code: str, name: str) -> dict[str, Any]:
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up while decorating
    exec(compile(code, f"<readme:{name}>", "exec"), module.__dict__)
    return module.__dict__


PRELUDE = """
import asyncio
from dataclasses import dataclass
from rca_aiohttp import Worker, TaskFiles
worker = Worker(worker_type="readme")
"""


def test_readme_has_examples() -> None:
    found = blocks()
    assert len(found) >= 10
    assert sum(is_program(b) for b in found) >= 4


@pytest.mark.parametrize("index", range(14))
def test_block_executes(index: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TASK_FILES_DIR", str(tmp_path))
    code = blocks()[index]
    if is_program(code):
        namespace = run_module(code, f"readme_block_{index}")
        worker = namespace.get("worker")
        assert worker is not None and worker._definition.handlers, (
            "a program defines a worker with handlers"
        )
        if "skill_dependencies" in code:
            assert worker._definition.skill_dependencies
        return
    # A snippet: give it a worker and, for bare ``return`` statements, a function.
    if re.search(r"^return\b", code, re.M):
        code = "def _snippet():\n" + textwrap.indent(code, "    ")
        namespace = run_module(
            PRELUDE.replace("worker = ", "_w = ") + code, f"readme_snippet_{index}"
        )
        result = namespace["_snippet"]()
        assert isinstance(result, dict) and "status" in result
        return
    if "pydantic" in code:
        pytest.importorskip("pydantic")
    namespace = run_module(PRELUDE + code, f"readme_snippet_{index}")
    assert (
        namespace["worker"]._definition.handlers or "BaseModel" in code or "worker = Worker" in code
    )


def test_programs_run_end_to_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The complete programs' handlers answer real tasks through the embedded orchestrator."""
    from rca_aiohttp._embedded import EmbeddedOrchestrator
    from rca_core.testing import FakeOrchestrator

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TASK_FILES_DIR", str(tmp_path))
    programs = [
        b for b in blocks() if is_program(b) and "s3://" not in b and "process_image" not in b
    ]
    assert programs

    async def exercise(code: str, n: int) -> list[dict[str, Any]]:
        worker = run_module(code, f"readme_program_{n}")["worker"]
        async with EmbeddedOrchestrator(FakeOrchestrator(hold=2.0)) as orch:
            worker.config.ORCHESTRATOR_URL = orch.url
            worker.config.WORKER_TOKEN = orch.fake.token
            serving = asyncio.create_task(worker.serve())
            names = list(worker._definition.handlers)
            for name in names:
                await orch.submit(name, {"filename": "cat.jpg", "width": 2, "height": 3})
            results = await orch.wait_for_results(len(names), within=30)
            await worker.stop()
            await asyncio.wait_for(serving, 30)
        return [r["result"] for r in results]

    for n, code in enumerate(programs):
        results = asyncio.run(exercise(code, n))
        assert results and all(r["status"] == "success" for r in results), results
