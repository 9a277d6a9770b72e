"""``WorkerConfig``, as in ``avtomatika_worker.config``: env first, then code overrides.

``RCA_BACKEND`` (``asyncio`` or ``trio``) chooses the event loop that
``Worker.run()`` starts when no ``backend=`` argument is given.
"""

from __future__ import annotations

from rca_core._config import WorkerConfig

__all__ = ["WorkerConfig"]
