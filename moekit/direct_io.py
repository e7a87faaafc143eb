"""Files written once, front to back: through the page cache, or around it with O_DIRECT.

A converted checkpoint is written once and not read back by the converter, so its bytes
need not pass through the page cache: on many machines writing new page-cache pages is the
slowest part of a conversion (a virtual machine may fault in every fresh page from its
host), while direct I/O hands page-aligned buffers straight to the disk. ``StagedFile``
writes the page-aligned buffers its caller fills (the streaming executor builds several at
once); ``BufferedFile`` is the plain path, which copies byte ranges of other files in the
kernel (``copy_file_range``), the fastest way to write bytes that exist already.

Every file system works: where the kernel will not copy between two files (different file
systems: EXDEV; a file system without support: EINVAL, ENOSYS, EOPNOTSUPP) the bytes are
read and written; where a file system refuses O_DIRECT, at the open or at a write, the
file is written through the page cache. Errors that a plain write would meet as well
(EPERM, ETXTBSY, ENOSPC, EIO, ...) are raised.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
from pathlib import Path
from typing import BinaryIO

from .errors import MoekitError

BLOCK = 4096
"""Alignment of direct I/O offsets, sizes and memory: a page (mmap's alignment), which
every common logical block size divides."""
WRITEBACK_BYTES = 64 * 2**20
"""Bytes a page-cache file is written in before the kernel is asked to start writing them
to the disk (``sync_file_range``), so that the disk writes while the next bytes are
copied and the final fsync waits only for the last of them."""
SYNC_FILE_RANGE_WRITE = 2
"""``sync_file_range``'s flag that starts writeback of the range's dirty pages (no wait)."""
COPY_BUFFER_BYTES = 8 * 2**20
"""Bytes read at a time where the kernel does not copy between the files."""
NO_KERNEL_COPY = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
"""What ``copy_file_range`` answers where it cannot copy between two files that plain
reads and writes can."""
NO_DIRECT_IO = (errno.EINVAL, errno.EOPNOTSUPP)
"""What a file system answers to O_DIRECT (at open or at a write) that it does not allow."""


class BufferedFile:
    """Writes through the page cache; byte ranges of other files are copied by the kernel
    where it can, else read and written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")
        self._kernel_copy = True
        self._written_back = 0
        """File offset up to which writeback to the disk was started."""

    def write(self, data: memoryview) -> None:
        self._file.write(data)

    def write_from(self, fd: int, offset: int, size: int) -> None:
        """Append the bytes, WRITEBACK_BYTES at a time, starting the disk's writes of each
        piece once it is copied."""
        for start in range(0, size, WRITEBACK_BYTES):
            self._write_from(fd, offset + start, min(WRITEBACK_BYTES, size - start))
            self._start_writeback()

    def _write_from(self, fd: int, offset: int, size: int) -> None:
        self._file.flush()
        position = self._file.tell()
        done = self._copy_in_kernel(fd, offset, size, position) if self._kernel_copy else 0
        if done < size:
            self._file.seek(position + done)
            self._copy_by_reading(fd, offset + done, size - done)
        self._file.seek(position + size)

    def _start_writeback(self) -> None:
        """Start the disk's writes of what was written since the last start, once that is
        WRITEBACK_BYTES or more (where the kernel offers ``sync_file_range``: a hint,
        durability still comes from the fsync before the output is put in place)."""
        end = self._file.tell()
        sync_file_range = _sync_file_range()
        if end - self._written_back < WRITEBACK_BYTES or sync_file_range is None:
            return
        self._file.flush()
        sync_file_range(self._file.fileno(), ctypes.c_int64(self._written_back),
                        ctypes.c_int64(end - self._written_back), SYNC_FILE_RANGE_WRITE)
        self._written_back = end

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


@functools.cache
def _sync_file_range() -> "ctypes._CFuncPtr | None":
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    try:
        return ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None


class StagedFile:
    """A new file written front to back from page-aligned staging buffers, around the page
    cache (O_DIRECT) where the file system allows, else through it.

    Each ``write`` hands over the bytes ``[start, start + size)`` of the file, which the
    caller placed in its buffer after ``lead(start)`` bytes of room; writes come in file
    order, each starting where the last ended. The room is filled with the previous
    write's last partial block, so that every direct write starts and ends on a block
    boundary, and no byte is copied twice but those. What is left at the end, less than
    a block, is written through the page cache (O_DIRECT cleared). Callers build the next
    buffers while a ``write`` waits for the disk (``os.pwrite`` releases the GIL).
    """

    def __init__(self, path: Path, direct: bool = True) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o666)
            except OSError as err:
                if err.errno not in NO_DIRECT_IO:
                    raise
        if self._fd < 0:
            self._fd = os.open(path, flags, 0o666)
        self._carry = b""
        self._end = 0
        """File offset up to which bytes were handed over (the carry included)."""

    @staticmethod
    def lead(start: int) -> int:
        """Bytes of room a buffer for bytes from file offset ``start`` keeps before them."""
        return start % BLOCK

    def write(self, buffer: memoryview, start: int, size: int) -> None:
        """Write the ``size`` bytes at ``buffer[lead(start):]`` at file offset ``start``
        (``buffer`` page-aligned; ``start`` where the previous write ended). The buffer's
        first ``lead(start)`` bytes are overwritten."""
        if start != self._end:
            raise ValueError(f"{self.path.name}: bytes from {start} handed over where "
                             f"{self._end} comes next")
        lead = self.lead(start)
        buffer[:lead] = self._carry
        full = (lead + size) // BLOCK * BLOCK
        with buffer[:full] as blocks:
            self._pwrite(blocks, start - lead)
        self._carry = bytes(buffer[full:lead + size])
        self._end = start + size

    def close(self) -> None:
        """Write what is left (less than a block) and close the file."""
        try:
            if self._carry:
                self._stop_direct_io()
                self._pwrite(memoryview(self._carry), self._end - len(self._carry))
        finally:
            self.discard()

    def discard(self) -> None:
        """Close the file without writing what is left (after an error)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
        if not flags & getattr(os, "O_DIRECT", 0):
            return False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return True


def _source_ended(path: Path, missing: int) -> MoekitError:
    return MoekitError(f"a source file ended {missing} bytes before the data {path.name} "
                       "copies from it: was it truncated or replaced while moekit ran?")
