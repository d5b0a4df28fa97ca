"""Argument checks shared by every layer: one rule per kind of argument, one message.

A bad argument raises ``ValueError`` naming the argument and the value it got,
and, where it helps, what would work.
"""
from __future__ import annotations

from typing import Any

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: Any, hint: str = "") -> int:
    """``value`` if it is an ``int`` >= 1 (``bool`` is not); else ``ValueError("<name> must be a positive int, got ...")``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}{'; ' + hint if hint else ''}")
    return value
