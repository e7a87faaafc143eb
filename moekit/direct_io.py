"""Files written once, front to back: through the page cache, or around it with O_DIRECT.

A converted checkpoint is written once and not read back by the converter, so its bytes
need not pass through the page cache: on many machines writing new page-cache pages is the
slowest part of a conversion (a virtual machine may fault in every fresh page from its
host), while direct I/O hands page-aligned buffers straight to the disk. ``DirectFile``
gathers bytes in a ring of page-aligned buffers; full ones are written by a background
thread while the others fill, so the disk keeps writing while the next tensor is built.
``BufferedFile`` is the plain path; it copies byte ranges of other files in the kernel
(``copy_file_range``), which is the fastest way to write bytes that exist already.

Every file system works: where the kernel will not copy between two files (different file
systems: EXDEV; a file system without support: EINVAL, ENOSYS, EOPNOTSUPP) the bytes are
read and written; where a file system refuses O_DIRECT, at the open or at a write, the
file is written through the page cache. Errors that a plain write would meet as well
(EPERM, ETXTBSY, ENOSPC, EIO, ...) are raised.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

from .errors import MoekitError

BLOCK = 4096
"""Alignment of direct I/O offsets, sizes and memory: a page (mmap's alignment), which
every common logical block size divides."""
DIRECT_BUFFER_BYTES = 16 * 2**20
"""Bytes of each of a ``DirectFile``'s buffers (a multiple of BLOCK)."""
DIRECT_BUFFERS = 4
"""Buffers in a ``DirectFile``'s ring: what the disk can drain while a tensor is built."""
COPY_BUFFER_BYTES = 8 * 2**20
"""Bytes read at a time where the kernel does not copy between the files."""
NO_KERNEL_COPY = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
"""What ``copy_file_range`` answers where it cannot copy between two files that plain
reads and writes can."""
NO_DIRECT_IO = (errno.EINVAL, errno.EOPNOTSUPP)
"""What a file system answers to O_DIRECT (at open or at a write) that it does not allow."""


class OutputFile(Protocol):
    """A new file written sequentially."""

    def write(self, data: memoryview) -> None:
        """Append ``data``."""

    def write_from(self, fd: int, offset: int, size: int) -> None:
        """Append ``size`` bytes of the open file ``fd`` from ``offset``."""

    def close(self) -> None:
        """Finish the file."""


def open_output(path: Path, direct: bool) -> OutputFile:
    """A new (truncated) file at ``path``: a ``DirectFile`` when ``direct`` and the file
    system allows direct I/O, else a ``BufferedFile``."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return DirectFile(path)
        except OSError as err:
            if err.errno not in NO_DIRECT_IO:
                raise
    return BufferedFile(path)


class BufferedFile:
    """Writes through the page cache; byte ranges of other files are copied by the kernel
    where it can, else read and written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")
        self._kernel_copy = True

    def write(self, data: memoryview) -> None:
        self._file.write(data)

    def write_from(self, fd: int, offset: int, size: int) -> None:
        self._file.flush()
        position = self._file.tell()
        done = self._copy_in_kernel(fd, offset, size, position) if self._kernel_copy else 0
        if done < size:
            self._file.seek(position + done)
            self._copy_by_reading(fd, offset + done, size - done)
        self._file.seek(position + size)

    def close(self) -> None:
        self._file.close()

    def _copy_in_kernel(self, fd: int, offset: int, size: int, position: int) -> int:
        """Copy with ``copy_file_range``; return how many bytes were copied before it
        stopped (it is not used again for this file once it refuses)."""
        out = self._file.fileno()
        done = 0
        while done < size:
            try:
                n = os.copy_file_range(fd, out, size - done, offset + done, position + done)
            except OSError as err:
                if err.errno not in NO_KERNEL_COPY:
                    raise
                n = 0
            if n <= 0:
                self._kernel_copy = False
                break
            done += n
        return done

    def _copy_by_reading(self, fd: int, offset: int, size: int) -> None:
        """Append ``size`` bytes of ``fd`` from ``offset``, read into a buffer."""
        buffer = bytearray(min(size, COPY_BUFFER_BYTES))
        done = 0
        while done < size:
            n = os.preadv(fd, [memoryview(buffer)[:size - done]], offset + done)
            if n <= 0:
                raise _source_ended(self.path, size - done)
            self._file.write(memoryview(buffer)[:n])
            done += n


class DirectFile:
    """Writes around the page cache (O_DIRECT) from a ring of page-aligned buffers, the
    full ones written in order by a background thread while the next fills. What is left
    at the end, less than a buffer and of any length, is written through the page cache
    (O_DIRECT cleared)."""

    def __init__(self, path: Path, buffer_bytes: int = DIRECT_BUFFER_BYTES,
                 buffers: int = DIRECT_BUFFERS) -> None:
        if buffer_bytes % BLOCK:
            raise ValueError(f"direct I/O buffers must be a multiple of {BLOCK} bytes")
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
        self._buffers = [mmap.mmap(-1, buffer_bytes) for _ in range(buffers)]
        self._views = [memoryview(b) for b in self._buffers]
        self._current = 0
        self._filled = 0
        self._written = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="moekit-write")
        self._pending: list[Future | None] = [None] * buffers

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        while len(data):
            n = min(len(data), len(self._views[0]) - self._filled)
            self._views[self._current][self._filled:self._filled + n] = data[:n]
            self._advance(n)
            data = data[n:]

    def write_from(self, fd: int, offset: int, size: int) -> None:
        done = 0
        while done < size:
            with self._views[self._current][self._filled:size - done + self._filled] as room:
                n = os.preadv(fd, [room], offset + done)
            if n <= 0:
                raise _source_ended(self.path, size - done)
            self._advance(n)
            done += n

    def close(self) -> None:
        try:
            for i in range(len(self._pending)):
                self._wait(i)
            if self._filled:
                self._stop_direct_io()
                with self._views[self._current][:self._filled] as tail:
                    self._pwrite(tail, self._written)
        finally:
            self._writer.shutdown(wait=True)
            os.close(self._fd)
            for view in self._views:
                view.release()
            for buffer in self._buffers:
                buffer.close()

    def _advance(self, n: int) -> None:
        """``n`` more bytes are in the current buffer; hand it to the writer when full."""
        self._filled += n
        if self._filled < len(self._views[0]):
            return
        self._pending[self._current] = self._writer.submit(
            self._pwrite, self._views[self._current], self._written)
        self._written += self._filled
        self._current = (self._current + 1) % len(self._views)
        self._filled = 0
        self._wait(self._current)

    def _wait(self, index: int) -> None:
        """Let the background write of buffer ``index`` (of the ring) finish, raising its
        error once."""
        index %= len(self._pending)
        pending, self._pending[index] = self._pending[index], None
        if pending is not None:
            pending.result()

    def _pwrite(self, view: memoryview, offset: int) -> None:
        """Write ``view`` at ``offset``. A file system that accepted O_DIRECT at open but
        refuses a direct write (stricter alignment) gets this and later writes buffered."""
        done = 0
        while done < len(view):
            try:
                with view[done:] as rest:
                    done += os.pwrite(self._fd, rest, offset + done)
            except OSError as err:
                if err.errno not in NO_DIRECT_IO or not self._stop_direct_io():
                    raise

    def _stop_direct_io(self) -> bool:
        """Clear O_DIRECT on the file; False when it was clear already."""
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & os.O_DIRECT:
            return False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return True


def _source_ended(path: Path, missing: int) -> MoekitError:
    return MoekitError(f"a source file ended {missing} bytes before the data {path.name} "
                       "copies from it: was it truncated or replaced while moekit ran?")
