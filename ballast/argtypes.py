"""argparse ``type=`` callables for the scripts that parse their own arguments (benchmarks,
the training CLI): a bad value exits 2 with the option named, before any work starts."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def at_least(low: float, kind: Callable[[str], float] = int) -> Callable[[str], float]:
    """A number read by ``kind`` that is >= ``low`` (NaN never is)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


def counts(
    kind: Callable[[str], int] = int, *, skip_empty: bool = False
) -> Callable[[str], list[int]]:
    """Comma-separated whole numbers, each >= 1 (``kind`` reads one: ``int``, or one that
    also takes "1e6"; ``skip_empty``: "1,,2" is [1, 2] rather than refused)."""

    def parse(text: str) -> list[int]:
        try:
            values = [kind(t) for t in text.split(",") if t.strip() or not skip_empty]
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"want comma-separated counts, got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"every count must be >= 1, got {text!r}")
        return values

    return parse


def names(*allowed: str) -> Callable[[str], list[str]]:
    """Comma-separated names, each one of ``allowed`` ("" is none): a name misspelt is refused
    rather than silently measuring less than was asked for."""

    def parse(text: str) -> list[str]:
        values = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(unknown)} (choose from {', '.join(allowed)})"
            )
        return values

    return parse


def existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not an existing folder")
    return path
