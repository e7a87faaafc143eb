"""Errors moekit raises for bad input, and helpers that make their messages readable."""

from __future__ import annotations

from collections.abc import Iterable


class MoekitError(Exception):
    """Bad input or a refused operation.

    The message is written for a person: what was expected, what was found and where.
    The CLI prints it as one message, without a traceback.
    """


class PlanError(MoekitError):
    """Validation found problems; all of them are listed, grouped by layer."""

    def __init__(self, headline: str, problems: list[str]) -> None:
        self.headline = headline
        self.problems = problems
        super().__init__(headline + "\n" + "\n".join(f"  - {p}" for p in problems))


def compress_ranges(numbers: Iterable[int]) -> str:
    """Write integers as compact ranges: ``[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"``."""
    ordered = sorted(set(numbers))
    runs: list[str] = []
    start = prev = None
    for n in ordered:
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            runs.append(_run(start, prev))
        start = prev = n
    if start is not None:
        runs.append(_run(start, prev))
    return ", ".join(runs)


def _run(start: int, end: int | None) -> str:
    return str(start) if start == end else f"{start}-{end}"


def plural(n: int, word: str) -> str:
    """``plural(1, "expert") -> "expert"``, ``plural(3, "expert") -> "experts"``."""
    return word if n == 1 else word + "s"
