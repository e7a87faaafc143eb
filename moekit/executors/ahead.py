"""Reading a checkpoint's first bytes onto the device while its load is planned.

A load's plan is made from the headers alone, in Python (on an H200 host 25 ms for 2,754
header entries and 100 ms for 8,256), while kvikio's threads, which hold no GIL, would
wait for it. ``device.read_ahead`` queues kvikio reads of the first bytes the load will
read (``spans_of``) that the page cache holds (``cached_prefix``), into one buffer on the
device, once the headers are read; the device executor copies what its batches need from
that buffer on the device (``ReadAhead.segments``) and reads the rest as before. Nothing
is built before the plan is made and validated: a load that its plan refuses waits for
these reads (at memory speed) and drops them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from operator import itemgetter

import torch

from ..checkpoint import Checkpoint
from ..output import deferred_signals
from ..sources import FileSource
from .native import NativeFiles, NativeRead, kvikio_writable

AHEAD_BYTES = 2 * 2**30
"""The most bytes read ahead. On a 16-core H200 host, the plan of 8,256 header entries
(0.5 MiB experts) took 63 ms alone, and 74, 91 and 109 ms while kvikio read 1, 2 and 4
GiB ahead, each read by the time the plan was made: what is read ahead is mostly read for
free, and the buffer is held on the device until the batches that copy from it are
staged."""
_FILE, _OFFSET, _CHUNKS = itemgetter(1), itemgetter(4), itemgetter(5)
"""A TensorInfo's file, offset and chunks, as getters that run in C (a load asks them of
every header entry before it plans)."""
PIECE_BYTES = 64 * 2**20
"""Bytes of one read ahead (a batch waits only for the pieces it copies from)."""
_NOWAIT = getattr(os, "RWF_NOWAIT", None)
"""``preadv``'s flag for a read that fails rather than wait for the disk (Linux)."""


def pieces(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut at the file offsets that are multiples of ``size``."""
    cuts = [start, *range((start // size + 1) * size, end, size), end]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


@dataclass(frozen=True)
class Span:
    """Bytes ``[start, end)`` of ``file``, read ahead into the buffer from byte ``at``."""

    file: str
    start: int
    end: int
    at: int


def spans_of(checkpoint: Checkpoint, budget: int = AHEAD_BYTES) -> list[Span]:
    """What to read ahead of a load of ``checkpoint``: the data section of each of its
    safetensors files (from its first tensor's byte to the end of the file, which the
    tensors fill, as safetensors checks), files in the order the checkpoint lists their
    tensors, up to ``budget`` bytes in all. Nothing for other files, whose bytes need not
    all be tensors the load reads (a DCP file's optimizer state), nor for tensors made of
    others (``Checkpoint.made``) or saved in row chunks, whose parts may lie in files that
    no entry names."""
    infos, identities = checkpoint.tensors.values(), checkpoint.identities
    if checkpoint.made or any(map(_CHUNKS, infos)) or not all(
            name.endswith(".safetensors") for name in identities):
        return []
    # each file's first tensor: its lowest offset, as a file's header entries are listed in
    # the order of their bytes (``checkpoint._add_entries``)
    starts = dict(zip(map(_FILE, reversed(infos)), map(_OFFSET, reversed(infos))))
    spans: list[Span] = []
    at = 0
    for file in dict.fromkeys(map(_FILE, infos)):
        if file not in identities:
            return []
        start = starts[file]
        end = min(identities[file].size, start + budget - at)
        if end > start:
            spans.append(Span(file, start, end, at))
            at += end - start
        if at == budget:
            break
    return spans


def cached_prefix(spans: list[Span], files: FileSource) -> list[Span]:
    """The part of ``spans`` up to the first piece (of PIECE_BYTES) whose first or last
    byte the page cache does not hold: what is read ahead at memory speed. What the disk
    must serve gains little from it (a plan takes a fraction of such a read), and a load
    that its plan refuses, or an interrupted one, would wait for it as long as the disk
    takes (tens of seconds on network storage)."""
    out: list[Span] = []
    for span in spans:
        fd = files.descriptor(span.file)
        for a, b in pieces(span.start, span.end, PIECE_BYTES):
            if not (_cached(fd, a) and _cached(fd, b - 1)):
                if a > span.start:
                    out.append(Span(span.file, span.start, a, span.at))
                return out
        out.append(span)
    return out


def _cached(fd: int, offset: int) -> bool:
    """Whether the page cache holds byte ``offset`` of the file open as ``fd``: a read that
    would wait for the disk fails at once with ``RWF_NOWAIT``; where the file system (or
    the system) cannot tell, it counts as not held."""
    try:
        return os.preadv(fd, [bytearray(1)], offset, _NOWAIT) == 1
    except (OSError, TypeError):  # TypeError: no RWF_NOWAIT here
        return False


def spanned(spans: list[Span]) -> int:
    """The bytes ``spans`` hold (laid out one after the other)."""
    return spans[-1].at + spans[-1].end - spans[-1].start if spans else 0


class ReadAhead:
    """Reads of a checkpoint's first bytes (``spans``) into ``buffer``, queued on kvikio
    handles (``native``) of the files that ``files`` opened and checked. A load's executor
    reads with ``files`` and ``native`` and waits for every read before the memory is
    freed; ``close`` waits for them and closes the files in any case (again: waiting and
    closing twice do nothing)."""

    def __init__(self, files: FileSource, native: NativeFiles,
                 buffer: torch.Tensor | None = None, spans: tuple[Span, ...] | list[Span] = ()
                 ) -> None:
        self.files, self.native, self.buffer, self.spans = files, native, buffer, spans
        self.by_file: dict[str, list[Span]] = {}
        for span in sorted(spans, key=lambda span: (span.file, span.start)):
            self.by_file.setdefault(span.file, []).append(span)
        self.reads: list[tuple[str, int, int, NativeRead]] = []

    @classmethod
    def start(cls, checkpoint: Checkpoint, device: torch.device, spans: list[Span]
              ) -> "ReadAhead | None":
        """Open the checkpoint's files with kvikio and queue the reads of what the page
        cache holds of ``spans`` (``cached_prefix``); None where it holds none of them,
        kvikio cannot open a file or the buffer cannot be had (the load then reads as it
        would), MoekitError where a file changed since its header was read. What is opened
        is closed again on any error."""
        files = FileSource(checkpoint)
        try:
            native = NativeFiles(files, set(map(_FILE, checkpoint.tensors.values())))
        except BaseException as err:
            files.close()
            if isinstance(err, (OSError, RuntimeError)):  # e.g. kvikio refuses the file
                return None
            raise
        opened = cls(files, native)
        try:
            spans = cached_prefix(spans, files)
            if spans:
                ahead = cls(files, native, kvikio_writable(spanned(spans), device), spans)
                ahead._queue()
                return ahead
        except torch.cuda.OutOfMemoryError:
            pass
        except BaseException:
            opened.close()  # (an interrupt is raised once every read is queued)
            raise
        opened.close()
        return None

    def _queue(self) -> None:
        """Queue the kvikio reads of the spans, in their order (the load's), each recorded
        to be waited for."""
        with deferred_signals():
            for span in self.spans:
                for a, b in pieces(span.start, span.end, PIECE_BYTES):
                    at = span.at + a - span.start
                    self.reads.append((span.file, a, b, self.native.read(
                        span.file, self.buffer[at:at + b - a], a)))

    def segments(self, file: str, start: int, size: int
                 ) -> list[tuple[int, int, int | None]]:
        """Bytes ``[start, start + size)`` of ``file`` in consecutive segments: (first
        byte, size, where the buffer holds them, or None where it does not)."""
        end, out = start + size, []
        for span in self.by_file.get(file, ()):
            if span.end <= start or span.start >= end:
                continue
            first, last = max(start, span.start), min(end, span.end)
            if first > start:
                out.append((start, first - start, None))
            out.append((first, last - first, span.at + first - span.start))
            start = last
        if start < end:
            out.append((start, end - start, None))
        return out

    def holds(self, file: str, start: int, size: int) -> bool:
        """Whether the buffer holds any of bytes ``[start, start + size)`` of ``file``."""
        return any(at is not None for _, _, at in self.segments(file, start, size))

    def wait(self, file: str, start: int, end: int) -> None:
        """Wait for the reads of ``file``'s bytes ``[start, end)``; MoekitError naming the
        file where one of them failed or came short."""
        for name, a, b, read in self.reads:
            if name == file and a < end and b > start:
                read.result()

    def release(self) -> None:
        """Drop the buffer: every copy from it is queued (a read still under way holds
        its own view of the memory)."""
        self.buffer = None

    def close(self) -> None:
        """Wait for every read (kvikio writes into the buffer until then), close the
        files and drop the buffer."""
        with deferred_signals():
            try:
                self.native.drain()
            finally:
                try:
                    self.native.close()
                finally:
                    self.files.close()
                    self.release()

