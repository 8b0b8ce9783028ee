"""Warnings on the command line: one line each, ``warning: ...``.

Python prints a warning as two lines (where it was raised, then the source line), which in a
command's output reads like a traceback. Command lines show the message alone; called from
Python, warnings keep their usual form (and can be filtered or turned into errors).
"""
from __future__ import annotations

import warnings

__all__ = ["one_line_warnings"]


def _one_line(message, category, filename, lineno, line=None) -> str:
    kind = "" if category is UserWarning else f"{category.__name__}: "
    return "warning: " + " ".join(f"{kind}{message}".split()) + "\n"


def one_line_warnings() -> None:
    """Print every later warning of this process as one line (for a command line's ``main``)."""
    warnings.formatwarning = _one_line
