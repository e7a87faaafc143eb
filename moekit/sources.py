"""Where recipes read from: checkpoint files (through safetensors) or an in-memory dict."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import Checkpoint
from .dtypes import itemsize
from .errors import MoekitError
from .plan import Read


class TensorSource(Protocol):
    """Something a recipe's reads can be served from."""

    def read(self, region: Read) -> torch.Tensor:
        """The tensor region ``region`` names (it may share memory with the source)."""


class FileSource:
    """Reads tensor regions from a checkpoint's files; only the requested bytes are read.

    Files are opened lazily and re-opened after every ``RELEASE_EVERY_BYTES`` read, so
    that the mapped pages of finished work do not pile up in the process's resident memory.
    """

    RELEASE_EVERY_BYTES = 32 * 2**20

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._handles: dict[str, object] = {}
        self._fds: dict[str, int] = {}
        self.bytes_read = 0
        self._since_release = 0

    def read(self, region: Read) -> torch.Tensor:
        if self._since_release >= self.RELEASE_EVERY_BYTES:
            self.release()
        file = self.checkpoint.file_of(region.key)
        try:
            handle = self._handle(file)
            if region.is_whole:
                tensor = handle.get_tensor(region.key)
            else:
                tensor = handle.get_slice(region.key)[region.region]
        except (SafetensorError, OSError) as err:
            raise MoekitError(f"cannot read {region.key} from {Path(self.checkpoint.path, file)}: "
                              f"{err}") from err
        size = tensor.numel() * tensor.element_size()
        self.bytes_read += size
        self._since_release += size
        return tensor

    def location(self, key: str) -> tuple[int, int]:
        """(file descriptor, byte offset) of tensor ``key``'s data, for reading it with
        ``pread`` or copying it in the kernel; each file is opened once."""
        info = self.checkpoint.tensors[key]
        fd = self._fds.get(info.file)
        if fd is None:
            path = self.checkpoint.path / info.file
            try:
                fd = self._fds[info.file] = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise MoekitError(f"cannot open {path}: {err.strerror or err}") from err
        return fd, info.offset

    def byte_range(self, region: Read) -> tuple[int, int, int] | None:
        """``(fd, offset, size)`` of the bytes a region covers, when they are contiguous in
        its file (a whole tensor, or leading indices then one slice), else None."""
        info = self.checkpoint.tensors[region.key]
        span = contiguous_span(region.region, info.shape)
        if span is None:
            return None
        fd, start = self.location(region.key)
        first, count = span
        item = itemsize(info.dtype)
        return fd, start + first * item, count * item

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.checkpoint.path / file), framework="pt")
        return self._handles[file]

    def release(self) -> None:
        """Drop the safetensors handles (and with them their mapped pages). Plain file
        descriptors map nothing and stay open until ``close``."""
        self._handles.clear()
        self._since_release = 0

    def close(self) -> None:
        """Close every open file."""
        self.release()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def contiguous_span(region: tuple, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(first element, element count) of a region of a row-major tensor when the region is
    one contiguous run: integer indices, then at most one step-1 slice followed only by
    whole dimensions; else None."""
    first, index = 0, 0
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    for dim, item in enumerate(region):
        if isinstance(item, int):
            first += item * strides[dim]
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

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state_dict = state_dict

    def read(self, region: Read) -> torch.Tensor:
        tensor = self.state_dict[region.key]
        return tensor[region.region] if region.region else tensor
