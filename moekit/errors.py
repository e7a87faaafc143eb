"""Errors moekit raises for bad input, and helpers that make their messages readable."""

from __future__ import annotations

from collections.abc import Iterable


class MoekitError(Exception):
    """Bad input or a refused operation.

    The message is written for a person: what was expected, what was found and where.
    The CLI prints it as one message, without a traceback. Its text is ``printable``
    (newlines kept): names taken from a file cannot drive the terminal it is shown on.
    """

    LINE_LIMIT = 1000
    """Characters shown of any one line: a name read from a file may be megabytes long."""

    def __str__(self) -> str:
        return "\n".join(shortened(line, self.LINE_LIMIT) for line in
                         printable(super().__str__(), newlines=True).split("\n"))


class PlanError(MoekitError):
    """Validation found problems, grouped by layer, one a line; the message shows the
    first ``LISTED`` and counts the rest (``problems`` keeps them all)."""

    LISTED = 20

    def __init__(self, headline: str, problems: list[str]) -> None:
        self.headline = headline
        self.problems = problems
        more = len(problems) - self.LISTED
        lines = [f"  - {printable(p)}" for p in problems[:self.LISTED]]
        if more > 0:
            lines.append(f"  ... and {more} more {'problem' if more == 1 else 'problems'}")
        super().__init__(headline + "\n" + "\n".join(lines))


def printable(text: str, newlines: bool = False) -> str:
    """``text`` with every character that is not printable (terminal controls such as ESC,
    CR, the C1 control CSI ``\\x9b``, bidirectional overrides, ...) written as a Python
    escape, so that a tensor or file name read from a checkpoint prints as one harmless
    line; ``newlines=True`` keeps ``\\n`` (for messages of several lines).

    >>> printable("model.\\x1b[2Jlayers")
    'model.\\\\x1b[2Jlayers'
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or (newlines and c == "\n") else _escape(c)
                   for c in text)


def shortened(text: str, limit: int) -> str:
    """``text``, or its start and end around a count of what was left out when it is
    longer than ``limit`` characters."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}...[{len(text) - 2 * keep} characters]...{text[-keep:]}"


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def compress_ranges(numbers: Iterable[int]) -> str:
    """Write integers as compact ranges: ``[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"``."""
    return compress_runs((n, n) for n in numbers)


def compress_runs(runs: Iterable[tuple[int, int]]) -> str:
    """Write runs (first, last) of integers as compact ranges, merging those that touch or
    overlap: ``[(0, 2), (5, 5), (3, 3)] -> "0-3, 5"`` (without listing their members, so
    that a run of a million costs nothing)."""
    merged: list[list[int]] = []
    for start, stop in sorted(runs):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in merged)


def plural(n: int, word: str) -> str:
    """``plural(1, "expert") -> "expert"``, ``plural(3, "expert") -> "experts"``."""
    return word if n == 1 else word + "s"


NAME_A_CONFIG = ("name the model's config.json with --config (convert, inspect, verify, "
                 "plan) or config= in Python")
"""How a refusal of a checkpoint that lacks its config.json says to give one."""
