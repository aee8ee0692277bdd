"""Checks of config values: each failure is a :class:`~fedmoe.errors.ConfigError` whose one-line
message names the key, the value and the allowed range."""

from __future__ import annotations

import math
from typing import Any, Iterable

from fedmoe.errors import ConfigError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None, hint: str = "") -> None:
    """``value`` is an integer in ``[low, high]`` (either bound may be open-ended)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be an integer{_range_text(low, high)}{_hint(hint)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}={value} is out of range: must be an integer{_range_text(low, high)}{_hint(hint)}")


def check_float(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """``value`` is a finite number in the interval given by the bounds (closed unless ``*_open``)."""
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number{_interval(low, high, low_open, high_open)}{_hint(hint)}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        raise ConfigError(
            f"{key}={value} is out of range: must be{_interval(low, high, low_open, high_open)}{_hint(hint)}"
        )


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(map(repr, choices))}")


def _range_text(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _hint(hint: str) -> str:
    return f"; {hint}" if hint else ""
