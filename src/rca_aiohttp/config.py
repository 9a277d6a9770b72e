"""``WorkerConfig``, as in ``avtomatika_worker.config``: env first, then code overrides."""

from __future__ import annotations

from rca_core._config import WorkerConfig

__all__ = ["WorkerConfig"]
