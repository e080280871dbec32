"""Field checks shared by every config, so each refusal reads the same: a ValueError naming the field, the rule and
the value. Booleans are not numbers here (``True`` is an ``int`` to Python, never a step count to us)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> None:
    """``value`` is an integer within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_number(name: str, value: object, minimum: float | None = None, *, strict: bool = False) -> None:
    """``value`` is a finite number, ``>= minimum`` (``> minimum`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_options(owner: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    """Every key of ``options`` (overrides of ``owner``'s fields) is one of ``allowed``; the error lists them."""
    known = sorted(allowed)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown {owner} option(s) {unknown}; valid: {', '.join(known)}")
