"""Numeric settings the node's processes read from environment variables, checked in one place."""

from __future__ import annotations

import os


def env_number(program: str, name: str, default: float, low: float, high: float, unit: str = "a number") -> float:
    """``$name`` as a number in [low, high] (``default`` when unset); anything else stops ``program`` with one line."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise SystemExit(f"{program}: {name}={raw!r}: expected {unit} between {low:g} and {high:g}")
    return value
