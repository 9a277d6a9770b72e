"""Shared pytest configuration: fixture modules are plugins under tests/support."""

from __future__ import annotations

pytest_plugins: list[str] = [
    "tests.support.fault_orchestrator",
    "tests.support.orchestrator",
    "tests.support.seaweed",
    "tests.support.workers",
]
