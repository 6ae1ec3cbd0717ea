"""Argument types the command lines share: numbers checked at parse time (argparse exits 2)."""

from __future__ import annotations

import argparse
import math


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def nonnegative_finite(s: str) -> float:
    v = float(s)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {s}")
    return v


def add_default_flags(
    p: argparse.ArgumentParser, defaults: object, *fields: str, **helps: str
) -> None:
    """One `--field-name` per field of `defaults` (a config dataclass), typed and defaulted by its
    value there, so a default is declared once, in the config. `helps` by field name."""
    for name in fields:
        value = getattr(defaults, name)
        if not isinstance(value, int | float | str) or isinstance(value, bool):
            raise TypeError(f"{name}: only int, float and str fields become flags this way")
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                       help=helps.get(name))
