"""Where recipes read from: checkpoint files (read with ``pread``) or an in-memory dict."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .checkpoint import (Checkpoint, TensorInfo, check_unchanged, open_regular,
                         open_unchanged)
from .dtypes import itemsize, to_torch
from .errors import MoekitError, printable
from .plan import Read, checked_index

if TYPE_CHECKING:
    import torch


class TensorSource(Protocol):
    """Something a recipe's reads can be served from."""

    def read(self, region: Read) -> "torch.Tensor":
        """The tensor region ``region`` names (it may share memory with the source)."""


class FileSource:
    """Reads tensor regions from a checkpoint's files; only the requested bytes are read.

    Bytes are read with ``pread`` into memory of their own, never through a memory map:
    a source file truncated while moekit runs then gives a short read, reported as an
    error, where a mapped page past the new end would kill the process (SIGBUS). Each file
    is opened once and checked to be the file whose header was read (same inode, size and
    modification time); ``check_unchanged`` checks again once everything is read.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._fds: dict[str, int] = {}
        self.bytes_read = 0

    def read(self, region: Read) -> "torch.Tensor":
        import torch

        info = self.checkpoint.tensors[region.key]
        data = torch.empty(self.block_bytes(region), dtype=torch.uint8)
        shape, within = self.read_block(region, memoryview(data.numpy()))
        block = data.view(to_torch(info.dtype)).reshape(shape)
        return block[within] if within else block

    def block_bytes(self, region: Read) -> int:
        """Bytes of the run of elements that holds ``region`` (see ``bounding_block``)."""
        info = self.checkpoint.tensors[region.key]
        return bounding_block(region.region, info.shape)[1] * itemsize(info.dtype)

    def read_block(self, region: Read, buffer: memoryview) -> tuple[tuple[int, ...], tuple]:
        """Read the run of elements that holds ``region`` into the first ``block_bytes``
        bytes of ``buffer``; return the run's shape and the region within the run. Torch
        is not needed: the file-to-file path moves these bytes with numpy."""
        info = self.checkpoint.tensors[region.key]
        first, count, shape, within = bounding_block(region.region, info.shape)
        done = 0
        for fd, start, size, file in self._spans(info, first, count):
            with buffer[done:done + size] as view:
                _read_exactly(fd, view, start, self.checkpoint.path / file, region.key)
            done += size
        self.bytes_read += done
        return shape, within

    def byte_range(self, region: Read) -> tuple[int, int, int] | None:
        """``(fd, offset, size)`` of the bytes a region covers, when they are contiguous in
        its file (a whole tensor, or leading indices then one slice), else None."""
        info = self.checkpoint.tensors[region.key]
        span = contiguous_span(region.region, info.shape)
        if span is None:
            return None
        spans = self._spans(info, *span)
        return spans[0][:3] if len(spans) == 1 else None

    def _spans(self, info: TensorInfo, first: int, count: int
               ) -> list[tuple[int, int, int, str]]:
        """(fd, byte offset, bytes, file) of elements ``first`` to ``first + count`` of a
        tensor, in order: one run, or one per row chunk they touch."""
        item = itemsize(info.dtype)
        out, at = [], 0
        for run in info.chunks or (info,):
            n = math.prod(run.shape)
            low, high = max(first, at), min(first + count, at + n)
            if low < high:
                out.append((self.descriptor(run.file), run.offset + (low - at) * item,
                            (high - low) * item, run.file))
            at += n
        return out

    def descriptor(self, file: str) -> int:
        """The open descriptor of the checkpoint's ``file``, opened on first use and refused
        when it is no longer the file whose header was read."""
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = self._open(file)
        return fd

    def check_unchanged(self) -> None:
        """Raise MoekitError when a file read so far changed while it was read (written to
        in place, truncated): what was read from it may be a mix of old and new bytes."""
        for file, fd in self._fds.items():
            check_unchanged(fd, self.checkpoint.path / file, self.checkpoint.identities[file])

    def _open(self, file: str) -> int:
        path = self.checkpoint.path / file
        identity = self.checkpoint.identities.get(file)
        return open_regular(path) if identity is None else open_unchanged(path, identity)

    def close(self) -> None:
        """Close every open file."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unreadable(file: str, reason: object) -> MoekitError:
    """The refusal of a checkpoint file that a reader of byte ranges cannot read."""
    return MoekitError(f"cannot read {printable(file)}: {reason}")


def truncated(file: str, end: int) -> MoekitError:
    """The refusal of a checkpoint file that ends before byte ``end`` of a read."""
    return MoekitError(f"{printable(file)} ends before byte {end}: the file is truncated")


def _read_exactly(fd: int, view: memoryview, offset: int, path: Path, key: str) -> None:
    """Fill ``view`` with the file's bytes from ``offset``; MoekitError when the file ends
    first or cannot be read."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as err:
            raise MoekitError(f"cannot read {key} from {printable(str(path))}: "
                              f"{err.strerror or err}") from err
        if n <= 0:
            raise MoekitError(f"{printable(str(path))} ends before the bytes of {key} (byte "
                              f"{offset + len(view):,}): was it truncated or replaced while "
                              "moekit ran?")
        done += n


def bounding_block(region: tuple, shape: tuple[int, ...]
                   ) -> tuple[int, int, tuple[int, ...], tuple]:
    """The one run of elements of a row-major tensor that holds ``region``: (first element,
    element count, the run's shape, the region within the run).

    The run spans the region's leading integer indices and, along its first slice, the
    rows from the first selected to the last; later dimensions are read whole. moekit's
    regions select one expert, then at most a part of its rows or columns, so the run is
    at most one expert's tensor (one source tensor for upcycling's slices)."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    first = 0
    for dim, item in enumerate(region):
        if isinstance(item, int):
            first += checked_index(item, shape[dim]) * strides[dim]
            continue
        picked = range(*item.indices(shape[dim]))
        if not picked:
            return first, 0, (0, *shape[dim + 1:]), (slice(None), *region[dim + 1:])
        low, high = picked[0], picked[-1] + 1  # steps are positive, as torch's are
        within = slice(0, high - low, picked.step)
        return (first + low * strides[dim], (high - low) * strides[dim],
                (high - low, *shape[dim + 1:]), (within, *region[dim + 1:]))
    rest = shape[len(region):]
    return first, math.prod(rest), rest, ()


def contiguous_span(region: tuple, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(first element, element count) of a region of a row-major tensor when the region is
    one contiguous run: integer indices, then at most one step-1 slice followed only by
    whole dimensions; else None."""
    first, index = 0, 0
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    for dim, item in enumerate(region):
        if isinstance(item, int):
            first += checked_index(item, shape[dim]) * strides[dim]
            index = dim + 1
            continue
        start, stop, step = item.indices(shape[dim])
        rest = region[dim + 1:]
        whole_rest = all(isinstance(r, slice) and r.indices(shape[dim + 1 + k]) ==
                         (0, shape[dim + 1 + k], 1) for k, r in enumerate(rest))
        if step != 1 or not whole_rest:
            return None
        return first + start * strides[dim], (stop - start) * strides[dim]
    return first, (strides[index - 1] if index else math.prod(shape))


class DictSource:
    """Reads tensor regions from an in-memory state dict (views, no copies)."""

    def __init__(self, state_dict: Mapping[str, "torch.Tensor"]) -> None:
        self.state_dict = state_dict

    def read(self, region: Read) -> "torch.Tensor":
        tensor = self.state_dict[region.key]
        return tensor[region.region] if region.region else tensor
