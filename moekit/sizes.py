"""Human sizes: parsing ``5GB`` (decimal, as transformers does) or ``512MiB``, and printing."""

from __future__ import annotations

import re

from .errors import MoekitError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def format_size(n: int) -> str:
    """``1536 -> "1.50 KiB"``: bytes in the largest binary unit that keeps a number >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def parse_size(size: int | str) -> int:
    """Bytes in ``size``, at least one: an int, or a number with a unit (``5GB``,
    ``200MiB``, ``64KB``)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = (re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
                 if isinstance(size, str) else None)
        if not match or match[2].upper() not in _UNITS:
            raise MoekitError(f"cannot read the size {size!r}; write e.g. 5GB, 500MB or 2GiB")
        value = int(float(match[1]) * _UNITS[match[2].upper()])
    if value < 1:
        raise MoekitError(f"the size {size!r} is less than one byte; write e.g. 5GB, 500MB or 2GiB")
    return value
