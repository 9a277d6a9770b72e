"""``python -m rca_aiohttp``: the ``rca-worker`` command."""

from __future__ import annotations

import sys

from ._cli import main

sys.exit(main())
