"""On/off switches read from the environment, spelled one way across the package."""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["flag"]

_OFF = ("0", "false", "no", "off")


def flag(name: str, default: Optional[bool] = None) -> Optional[bool]:
    """``name`` as a switch: unset or empty gives ``default``; ``0``, ``false``, ``no``, ``off``
    (any case) give False; any other value True."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in _OFF
