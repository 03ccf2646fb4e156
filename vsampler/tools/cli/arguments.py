"""Argument types the commands share."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    values = int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def id_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """ "100-199,2" -> ((100, 200), (2, 3)): token ids and inclusive ranges, as half-open intervals."""
    ranges = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected ids and ranges like 100-199,2, got {text!r}") from None
        if first < 0 or last < first:
            raise argparse.ArgumentTypeError(f"expected ids >= 0 and ranges low-high with low <= high, got {part!r}")
        ranges.append((first, last + 1))
    return tuple(ranges)


def choice_list(choices: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown value(s) {bad or text!r}; choose from {', '.join(choices)}")
        return values

    return parse
