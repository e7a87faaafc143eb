"""The streaming executor: plan -> sharded safetensors files, in bounded memory.

A shard whose every tensor is a concatenation of source byte ranges is copied by the
kernel (``copy_file_range``). A shard with tensors to build is cut into batches of about
BATCH_BYTES of consecutive output bytes (the header, byte ranges of source files, one
expert of a stacked tensor, or a whole other tensor); a thread per core fills batches
into page-aligned buffers at once (``pread`` and numpy copies release the GIL) while the
calling thread writes the finished ones, in order, around the page cache
(``direct_io.StagedFile``). Memory is a few batches, whatever the model's size. Recipes
that only move bytes are built with numpy (``host``), so a conversion does not import
torch; recipes with arithmetic are built with torch (``evaluate``).
"""

from __future__ import annotations

import json
import mmap
import os
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Protocol, Union, runtime_checkable

import numpy as np

from ..checkpoint import INDEX_NAME, SINGLE_NAME
from ..cores import usable_cpus
from ..direct_io import BLOCK, StagedFile
from ..errors import MoekitError, printable
from ..plan import Concat, Expr, Plan, Read, Stack, TensorPlan, nbytes
from ..progress import progress
from ..safetensors_writer import ShardWriter, header_bytes
from ..sources import TensorSource
from .host import BlockSource, element_dtype, fill, movable

BATCH_BYTES = 8 * 2**20
"""Output bytes one builder fills at a time (a piece larger than this is a batch alone)."""
BUILDERS = usable_cpus()
"""Builder threads: one per core this process can keep busy (``usable_cpus``)."""
BUFFERS = BUILDERS + 2
"""Batches in flight: one being written, one finished waiting, one per builder."""

Span = tuple[int, int, int]
"""Bytes ``(fd, offset, size)`` of an open source file."""


@runtime_checkable
class RangeSource(Protocol):
    """A source that can say where a region's bytes lie in its files
    (``moekit.sources.FileSource``), so that they are copied rather than built."""

    def byte_range(self, region: Read) -> Span | None:
        """The region's bytes when they are contiguous in one file, else None."""


def shard_tensors(tensors: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own), as ``save_pretrained`` does."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [s for s in shards if s]


def shard_file_names(n: int) -> list[str]:
    """HF names: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_plan(plan: Plan, source: TensorSource, folder: Path, max_shard_bytes: int,
               metadata: Mapping[str, str], show_progress: bool | None = None,
               finished: Callable[[Path], object] = lambda path: None) -> None:
    """Write every tensor of ``plan`` into ``folder`` as HF-sharded safetensors + index;
    ``finished(path)`` is called with each file once it is written and closed (so that it
    can be synced while the next is written: ``OutputFolder.sync_soon``)."""
    shards = shard_tensors(plan.tensors, max_shard_bytes)
    names = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    with progress(plan.total_bytes, f"{plan.src_layout} -> {plan.dst_layout}", show_progress) as bar:
        for name, shard in zip(names, shards):
            write_shard(folder / name, shard, source, metadata, bar.update)
            finished(folder / name)
            weight_map.update({t.name: name for t in shard})
    if len(shards) > 1:
        write_index(folder, plan.tensors, weight_map)
        finished(folder / INDEX_NAME)


def write_shard(path: Path, tensors: list[TensorPlan], source: TensorSource,
                metadata: Mapping[str, str], done: Callable[[int], object] = lambda n: None
                ) -> None:
    """Write one safetensors file holding ``tensors`` from ``source``; ``done(nbytes)`` is
    called as their bytes are written. Copied by the kernel when every tensor is a
    concatenation of source byte ranges, else built on every core (see the module)."""
    entries = [(t.name, t.dtype, t.shape) for t in tensors]
    ranges = [_byte_ranges(t.recipe, source) if isinstance(source, RangeSource) else None
              for t in tensors]
    if all(r is not None for r in ranges):
        with ShardWriter(path, entries, metadata) as writer:
            for tensor, tensor_ranges in zip(tensors, ranges):
                writer.copy_ranges(tensor.name, tensor_ranges)
                done(tensor.nbytes)
        return
    pieces: list[_Piece] = [_Header(header_bytes(entries, metadata))]
    on_host = isinstance(source, BlockSource)
    for tensor, tensor_ranges in zip(tensors, ranges):
        pieces += _pieces(tensor, tensor_ranges, on_host)
    with_torch = any(isinstance(p, _Built) and not p.on_host for p in pieces)
    _Build(path, source, done, with_torch).run(_batches(pieces))


def _byte_ranges(expr: Expr, source: RangeSource) -> list[Span] | None:
    """The file byte ranges whose concatenation is the tensor ``expr`` describes, when it
    is one (pass-through tensors; stacks and outer concatenations of contiguous regions,
    as HF <-> vllm/transformers conversions are), so that they are copied; else None."""
    if isinstance(expr, Read):
        found = source.byte_range(expr)
        return None if found is None else [found]
    if isinstance(expr, Stack) or (isinstance(expr, Concat) and not expr.interleave
                                   and all(n == 1 for n in expr.shape[:expr.dim % len(expr.shape)])):
        ranges: list[Span] = []
        for part in expr.parts:
            inner = _byte_ranges(part, source)
            if inner is None:
                return None
            ranges += inner
        return ranges
    return None


@dataclass(frozen=True)
class _Header:
    """The file's header bytes."""

    data: bytes
    tensor_bytes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def fill(self, view: memoryview, source: TensorSource) -> None:
        view[:] = self.data


@dataclass(frozen=True)
class _Span:
    """Bytes of a source file, copied as they are (a tensor passed through, or a part of a
    tensor's ranges)."""

    fd: int
    offset: int
    size: int

    @property
    def tensor_bytes(self) -> int:
        return self.size

    def fill(self, view: memoryview, source: TensorSource) -> None:
        done = 0
        while done < self.size:
            n = os.preadv(self.fd, [view[done:]], self.offset + done)
            if n <= 0:
                name = printable(os.readlink(f"/proc/self/fd/{self.fd}"))
                raise MoekitError(f"{name} ended {self.size - done} bytes before the data "
                                  "copied from it: was it truncated or replaced while moekit "
                                  "ran?")
            done += n


@dataclass(frozen=True)
class _Built:
    """A tensor, or one stacked part of it, built from its recipe: with numpy when the
    recipe only moves bytes of a file source, else with torch."""

    recipe: Expr
    on_host: bool

    @property
    def size(self) -> int:
        return nbytes(self.recipe.shape, self.recipe.dtype)

    @property
    def tensor_bytes(self) -> int:
        return self.size

    def fill(self, view: memoryview, source: TensorSource) -> None:
        dtype = element_dtype(self.recipe.dtype)
        out = np.frombuffer(view, dtype=dtype, count=self.size // dtype.itemsize)
        if self.on_host:
            fill(self.recipe, out.reshape(self.recipe.shape), source)
        else:
            out.view(np.uint8)[:] = _built_with_torch(self.recipe, source)


_Piece = Union[_Header, _Span, _Built]


def _built_with_torch(recipe: Expr, source: TensorSource) -> np.ndarray:
    """The bytes of a recipe evaluated by torch (arithmetic, or a source of tensors)."""
    from ..dtypes import to_torch
    from .evaluate import element_bytes, materialize

    tensor = materialize(recipe, source)
    if tuple(tensor.shape) != tuple(recipe.shape) or tensor.dtype != to_torch(recipe.dtype):
        raise RuntimeError(f"a recipe gave {list(tensor.shape)} {tensor.dtype} where the plan "
                           f"expects {list(recipe.shape)} {recipe.dtype}")
    return element_bytes(tensor).numpy()


def _pieces(tensor: TensorPlan, ranges: list[Span] | None, file_source: bool
            ) -> list[_Piece]:
    """A tensor's bytes as pieces: its source ranges, else its stacked parts (a layer's
    experts, one at a time), else the whole tensor; built with numpy from a
    ``file_source`` when the recipe only moves bytes."""
    if ranges is not None:
        return [_Span(*span) for span in ranges]
    recipe = tensor.recipe
    on_host = file_source and movable(recipe)
    parts = recipe.parts if isinstance(recipe, Stack) else (recipe,)
    return [_Built(part, on_host) for part in parts]


@dataclass
class _Batch:
    """Consecutive pieces, filled into one buffer: the output bytes from ``start`` on."""

    start: int
    pieces: list[_Piece]
    size: int = 0
    tensor_bytes: int = 0


def _batches(pieces: list[_Piece]) -> list[_Batch]:
    """Pieces, in order, in batches of at most BATCH_BYTES (or one larger piece). Byte
    ranges that continue one another in a file are merged, then cut at BATCH_BYTES."""
    batches: list[_Batch] = []
    start = 0
    for piece in _merged_spans(pieces):
        last = batches[-1] if batches else None
        if last is None or (last.size and last.size + piece.size > BATCH_BYTES):
            last = _Batch(start, [])
            batches.append(last)
        last.pieces.append(piece)
        last.size += piece.size
        last.tensor_bytes += piece.tensor_bytes
        start += piece.size
    return batches


def _merged_spans(pieces: list[_Piece]) -> list[_Piece]:
    """Spans that continue one another in one file joined, then cut into BATCH_BYTES."""
    joined: list[_Piece] = []
    for piece in pieces:
        last = joined[-1] if joined else None
        if (isinstance(piece, _Span) and isinstance(last, _Span) and last.fd == piece.fd
                and last.offset + last.size == piece.offset):
            joined[-1] = _Span(last.fd, last.offset, last.size + piece.size)
        else:
            joined.append(piece)
    out: list[_Piece] = []
    for piece in joined:
        if isinstance(piece, _Span):
            out += [_Span(piece.fd, piece.offset + at, min(BATCH_BYTES, piece.size - at))
                    for at in range(0, piece.size, BATCH_BYTES)]
        else:
            out.append(piece)
    return out


class _Build:
    """Builder threads fill batches into page-aligned buffers, up to BUFFERS ahead of the
    one the calling thread writes. Pieces built ``with_torch`` read through a source that
    keeps the statistics redraws read, for the shard."""

    def __init__(self, path: Path, source: TensorSource, done: Callable[[int], object],
                 with_torch: bool = False) -> None:
        self.path = path
        self.source = source
        self.torch_source = source
        if with_torch:
            from .evaluate import KeepingStatistics

            self.torch_source = KeepingStatistics(source)
        self.done = done
        self.stopped = False

    def run(self, batches: list[_Batch]) -> None:
        """Build and write every batch, in order, into a new file at ``path``."""
        capacity = -(-(BLOCK + max(b.size for b in batches)) // BLOCK) * BLOCK
        free = [mmap.mmap(-1, capacity) for _ in range(min(BUFFERS, len(batches)))]
        pending: deque[tuple[_Batch, mmap.mmap, Future]] = deque()
        file = StagedFile(self.path)
        pool = ThreadPoolExecutor(BUILDERS, thread_name_prefix="moekit-build")
        try:
            for batch in batches:
                if not free:
                    free.append(self._write(file, *pending.popleft()))
                buffer = free.pop()
                pending.append((batch, buffer, pool.submit(self._fill, batch, buffer)))
            while pending:
                self._write(file, *pending.popleft())
            file.close()
        finally:
            self.stopped = True
            pool.shutdown(wait=True, cancel_futures=True)
            file.discard()

    def _fill(self, batch: _Batch, buffer: mmap.mmap) -> None:
        """Fill the batch's pieces into ``buffer`` after the room ``StagedFile`` keeps."""
        view = memoryview(buffer)
        at = StagedFile.lead(batch.start)
        for piece in batch.pieces:
            if self.stopped:
                return
            by_torch = isinstance(piece, _Built) and not piece.on_host
            piece.fill(view[at:at + piece.size], self.torch_source if by_torch else self.source)
            at += piece.size

    def _write(self, file: StagedFile, batch: _Batch, buffer: mmap.mmap, filled: Future
               ) -> mmap.mmap:
        """Write a batch once filled; return its buffer for the next."""
        filled.result()
        file.write(memoryview(buffer), batch.start, batch.size)
        self.done(batch.tensor_bytes)
        return buffer


def write_index(folder: Path, tensors: list[TensorPlan], weight_map: dict[str, str]) -> None:
    """Write ``model.safetensors.index.json`` for ``tensors`` stored as ``weight_map`` says."""
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors),
                     "total_parameters": sum(prod(t.shape) for t in tensors)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
