"""Writing a safetensors file header first, then one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a 5 GB
shard would then cost 5 GB of RAM. The format is a little-endian u64 header length, a
JSON header (dtype, shape and byte offsets per tensor, plus ``__metadata__``), and the raw
bytes, so once the plan fixes every shape the header can be written before any tensor
exists and each tensor streamed into place as it is built. Files written here are read
back with the safetensors library in the tests.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .direct_io import BufferedFile
from .dtypes import to_safetensors
from .plan import nbytes

if TYPE_CHECKING:
    import torch

_ALIGN = 8

Entry = tuple[str, str, tuple[int, ...]]
"""A tensor of a file's header: (name, safetensors dtype, shape)."""


def header_bytes(entries: Sequence[Entry], metadata: Mapping[str, str]) -> bytes:
    """The bytes a safetensors file starts with (length, then the JSON header, padded to
    8 bytes) when it holds ``entries``, in order, one after another."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in entries:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _ALIGN)
    return struct.pack("<Q", len(encoded)) + encoded


class ShardWriter:
    """One safetensors file whose tensors are written in the order the header lists them."""

    def __init__(self, path: Path, entries: Sequence[Entry], metadata: Mapping[str, str]
                 ) -> None:
        """``entries`` are (name, safetensors dtype, shape), in the order they will be
        written. The file is written through the page cache, so that byte ranges of other
        files are copied by the kernel (the streaming executor writes the files whose
        tensors it builds around the page cache itself)."""
        self.path = path
        self._expected = list(entries)
        self._next = 0
        self._file = BufferedFile(path)
        self._file.write(memoryview(header_bytes(entries, metadata)))
        self._run: tuple[int, int, int] | None = None
        """Byte range ``(fd, offset, size)`` of ``copy_ranges`` not copied yet: ranges
        that continue one another in the same file are copied as one."""

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        """Append the next tensor; it must be the one the header lists next."""
        import torch

        want_name, want_dtype, want_shape = self._expected[self._next]
        got = (name, to_safetensors(tensor.dtype), tuple(tensor.shape))
        if got != (want_name, want_dtype, tuple(want_shape)):
            raise RuntimeError(f"{self.path.name}: expected {want_name} {want_dtype} "
                               f"{list(want_shape)} next, got {got[0]} {got[1]} {list(got[2])}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._copy_run()
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def copy_ranges(self, name: str, ranges: Sequence[tuple[int, int, int]]) -> None:
        """Append the next tensor as the bytes ``(fd, offset, size)`` of other files, in
        order (copied by the kernel where the file is written through the page cache).
        A range that continues the previous one in the same file is copied with it, in
        one call, when the next tensor is written or the file closed."""
        want_name, want_dtype, want_shape = self._expected[self._next]
        if name != want_name or sum(r[2] for r in ranges) != nbytes(want_shape, want_dtype):
            raise RuntimeError(f"{self.path.name}: expected {want_name} next "
                               f"({nbytes(want_shape, want_dtype)} bytes), got {name}")
        for fd, offset, size in ranges:
            run = self._run
            if run is not None and run[0] == fd and run[1] + run[2] == offset:
                self._run = (fd, run[1], run[2] + size)
            else:
                self._copy_run()
                self._run = (fd, offset, size)
        self._next += 1

    def close(self) -> None:
        """Finish the file; every tensor of the header must have been written."""
        try:
            self._copy_run()
        finally:
            self._file.close()
        if self._next != len(self._expected):
            missing = self._expected[self._next][0]
            raise RuntimeError(f"{self.path.name} closed before {missing} was written")

    def _copy_run(self) -> None:
        """Copy the pending byte range, if any."""
        if self._run is not None:
            run, self._run = self._run, None
            self._file.write_from(*run)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
