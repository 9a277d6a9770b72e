"""The error codes a handler returns, as in the reference SDK's README (``…typing``)."""

from __future__ import annotations

from rca_core._errors import INVALID_INPUT_ERROR, PERMANENT_ERROR, TRANSIENT_ERROR

__all__ = ["INVALID_INPUT_ERROR", "PERMANENT_ERROR", "TRANSIENT_ERROR"]
