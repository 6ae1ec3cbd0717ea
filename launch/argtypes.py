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
