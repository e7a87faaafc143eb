"""Atomic output folders: written beside the destination, moved into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import MoekitError


def check_destination(dst: Path, src: Path | None, overwrite: bool) -> None:
    """Refuse a destination that would lose data: the source itself, inside the source,
    holding the source, or already existing (unless ``overwrite``)."""
    dst = dst.resolve()
    if src is not None:
        src = src.resolve()
        if dst == src or src in dst.parents:
            raise MoekitError(f"destination {dst} is inside the source {src}; choose a folder "
                              "outside it (moekit never writes into its input)")
        if dst in src.parents:
            raise MoekitError(f"destination {dst} contains the source {src}; choose another folder")
    if dst.exists() and not overwrite:
        raise MoekitError(f"destination {dst} already exists; pass --overwrite to replace it")


@contextmanager
def atomic_output(dst: Path, src: Path | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on success it replaces ``dst``, on any
    failure (or interrupt) it is removed and ``dst`` is left as it was."""
    dst = Path(dst)
    check_destination(dst, src, overwrite)
    tmp = temporary_folder(dst)
    try:
        yield tmp
        replace_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temporary_folder(dst: Path) -> Path:
    """A new empty folder beside ``dst`` (same file system, so the final rename is atomic)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.moekit-", dir=dst.parent))


def replace_folder(tmp: Path, dst: Path) -> None:
    """Move the finished folder ``tmp`` to ``dst``, replacing what was there."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.moekit-old-", dir=dst.parent))
    os.rmdir(old)
    os.rename(dst, old)
    os.rename(tmp, dst)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
