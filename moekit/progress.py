"""Progress bars on a terminal, silence elsewhere."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total: int, desc: str, enabled: bool | None = None) -> tqdm:
    """A byte-counting progress bar on stderr; shown only when stderr is a terminal
    unless ``enabled`` says otherwise."""
    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not show, leave=False, file=sys.stderr)
