"""Tensors that ranks saved in chunks, whatever the format: each chunk a run of bytes of
a file (a DCP ``.distcp`` archive's storage, a safetensors entry), put together as
``Checkpoint.tensors`` and ``Checkpoint.made`` hold a checkpoint's tensors. Torch-free, so
that safetensors files saved by ranks are read without it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from .checkpoint import TensorInfo, saved_offsets
from .errors import MoekitError, printable
from .plan import Concat, Expr, Read


class ChunkLike(Protocol):
    """Where a chunk lies in its whole tensor: DCP's ``ChunkStorageMetadata``, or a
    ``Chunk``."""

    @property
    def offsets(self) -> Sequence[int]: ...

    @property
    def sizes(self) -> Sequence[int]: ...


class Chunk(NamedTuple):
    """Where a chunk lies in its whole tensor, as DCP's ``ChunkStorageMetadata`` says."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


Run = tuple[str, tuple[int, ...], str, int]
"""Where a chunk's bytes lie: its file, shape, dtype and byte offset in the file."""


@dataclass(frozen=True)
class Chunked:
    """A tensor as ranks saved it: its key, shape and dtype, its chunks, where each
    chunk's bytes lie (``run(chunk, dtype)``, looked up only for chunks known to tile the
    tensor) and how a message names it."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    chunks: Sequence[ChunkLike]
    run: Callable[[ChunkLike, str], Run]
    where: str


def chunked_tensors(stored: list[Chunked]) -> tuple[dict[str, TensorInfo], dict[str, Expr]]:
    """The tensors of a checkpoint that ranks saved in chunks (``stored``), as
    ``Checkpoint.tensors`` and ``Checkpoint.made`` hold them. A tensor saved whole or in
    chunks of whole rows is one ``TensorInfo`` (its row chunks its ``chunks``); one saved
    in chunks that split other dimensions (``Shard(1)`` DTensors of tensor parallelism, or
    blocks of a 2-D mesh) is its blocks, each a tensor named ``KEY/chunk_OFFSETS``, and is
    made by concatenating them (``_tiled``), the others then each made by reading itself
    (``made`` is empty where no tensor is in blocks). A tensor with no elements is read
    however it was split. Chunks that leave a gap or overlap are refused naming the tensor."""
    keys = {tensor.key for tensor in stored}
    tensors: dict[str, TensorInfo] = {}
    tiled: dict[str, Expr] = {}
    for tensor in stored:
        key, shape, dtype, where = tensor.key, tensor.shape, tensor.dtype, tensor.where
        if math.prod(shape) == 0 and tensor.chunks:  # no byte to read, however split
            first = tensor.run(tensor.chunks[0], dtype)
            tensors[key] = TensorInfo(key, first[0], shape, dtype, first[3])
        elif _in_rows(tensor.chunks, shape):
            tensors[key] = _tensor(tensor)
        else:
            chunks, tiled[key] = _tiled(tensor)
            named = next((name for name in chunks if name in keys), None)
            if named is not None:
                raise MoekitError(f"{where} is saved in blocks, which moekit names as "
                                  f"{printable(named)}, a tensor of the checkpoint too")
            tensors.update(chunks)
    if not tiled:
        return tensors, {}
    return tensors, {tensor.key: tiled.get(tensor.key) or Read.whole(tensor.key,
                                                                     tensors[tensor.key])
                     for tensor in stored}


def sharded_safetensors(folder: Path, files: dict[str, tuple[dict[str, str], dict]]
                        ) -> tuple[dict[str, TensorInfo], dict[str, Expr]]:
    """The tensors of the safetensors ``files`` of ``folder`` (each file's metadata and
    header entries) that ranks saved with DCP's ``HuggingFaceStorageWriter`` and
    ``save_distributed=True``, as ``Checkpoint.tensors`` and ``Checkpoint.made`` hold them
    (``chunked_tensors``). Each file holds its rank's chunk of each tensor under the
    tensor's name and, in ``SHARDING_INFO``, the chunk's offsets; the tensor's shape is
    where its chunks end, as DCP's ``HuggingFaceStorageReader.read_metadata`` takes it
    (torch 2.13). NeMo AutoModel 0.7 saves its checkpoints' ``model/`` folder so unless
    told to consolidate it."""
    chunks: dict[str, dict[tuple[int, ...], TensorInfo]] = {}
    for name, (metadata, tensors) in files.items():
        offsets = saved_offsets(folder / name, metadata, tensors)
        for key, info in tensors.items():
            found = chunks.setdefault(key, {})
            if offsets[key] in found:
                raise MoekitError(f"{printable(str(folder / name))}: tensor {printable(key)} at "
                                  f"{list(offsets[key])} is saved in "
                                  f"{printable(found[offsets[key]].file)} too")
            found[offsets[key]] = info
    return chunked_tensors([_sharded(folder, key, found) for key, found in chunks.items()])


def _sharded(folder: Path, key: str, chunks: dict[tuple[int, ...], TensorInfo]) -> Chunked:
    """The tensor ``key`` of sharded safetensors files, from its ``chunks`` by offsets."""
    where = f"{printable(str(folder))}: {printable(key)}"
    first = next(iter(chunks.values()))
    other = next((info for info in chunks.values() if info.dtype != first.dtype
                  or len(info.shape) != len(first.shape)), None)
    if other is not None:
        raise MoekitError(f"{where} is saved in chunks of different dtypes or dimensions: "
                          f"{first.dtype} {list(first.shape)} in {printable(first.file)}, "
                          f"{other.dtype} {list(other.shape)} in {printable(other.file)}")
    shape = tuple(max(offsets[dim] + info.shape[dim] for offsets, info in chunks.items())
                  for dim in range(len(first.shape)))
    stored = [Chunk(offsets, info.shape) for offsets, info in chunks.items()]

    def run(chunk: ChunkLike, dtype: str) -> Run:
        info = chunks[tuple(chunk.offsets)]
        return info.file, info.shape, dtype, info.offset

    return Chunked(key, shape, first.dtype, stored, run, where)


def _in_rows(chunks: Sequence[ChunkLike], shape: tuple[int, ...]) -> bool:
    """True when ``chunks`` are the whole tensor, or each holds whole rows (every
    dimension but the first whole): what ``_row_chunks`` reads (or refuses, for rows
    missing)."""
    if len(chunks) == 1 and not any(chunks[0].offsets):
        return True
    return all(len(chunk.sizes) == len(shape) and tuple(chunk.sizes)[1:] == shape[1:]
               and not any(tuple(chunk.offsets)[1:]) for chunk in chunks)


def _tiled(tensor: Chunked) -> tuple[dict[str, TensorInfo], Expr]:
    """The chunks of a tensor saved in blocks, each a tensor named ``KEY/chunk_OFFSETS``
    (chunks with no elements left out), and the recipe that concatenates them into it; the
    blocks are checked to tile the tensor before their bytes are looked for."""
    key, shape, dtype, where = tensor.key, tensor.shape, tensor.dtype, tensor.where
    blocks, chunks = [], {}
    for chunk in tensor.chunks:
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                start < 0 or size < 0 or start + size > n
                for start, size, n in zip(offsets, sizes, shape)):
            raise MoekitError(f"{where}: a chunk at {list(offsets)} of {list(sizes)} lies "
                              f"outside its shape {list(shape)}")
        if math.prod(sizes):
            name = f"{key}/chunk_{'.'.join(map(str, offsets))}"
            blocks.append((offsets, sizes, Read(name, (), sizes, dtype)))
            chunks[name] = chunk
    recipe = assembled(blocks, (0,) * len(shape), shape, where)
    return {name: TensorInfo(name, *tensor.run(chunk, dtype))
            for name, chunk in chunks.items()}, recipe


def assembled(blocks: list[tuple[tuple[int, ...], tuple[int, ...], Read]],
               low: tuple[int, ...], high: tuple[int, ...], where: str) -> Expr:
    """The recipe of the box ``[low, high)`` of a tensor from the ``blocks`` inside it: a
    block that is the box is read whole; else the box is cut along its first dimension
    whose block starts cut it into slabs that no block crosses, and the slabs, each
    assembled so, are concatenated. A grid of blocks (DTensor shards on a mesh of any
    shape, even or not) is cut so. The blocks of a slab share their start on each
    dimension cut above it, so no dimension is cut twice on the way down: at most one
    level a dimension."""
    if len(blocks) == 1:
        offsets, sizes, read = blocks[0]
        if offsets == low and tuple(map(sum, zip(offsets, sizes))) == high:
            return read
    for dim in range(len(low)):
        slabs: dict[int, list] = {}
        for block in blocks:
            slabs.setdefault(block[0][dim], []).append(block)
        starts = sorted(slabs)
        if starts[:1] != [low[dim]]:
            break
        if len(starts) == 1:
            continue
        ends = dict(zip(starts, [*starts[1:], high[dim]]))
        if all(offsets[dim] + sizes[dim] == ends[offsets[dim]] for offsets, sizes, _ in blocks):
            return Concat(tuple(
                assembled(slabs[start], (*low[:dim], start, *low[dim + 1:]),
                           (*high[:dim], ends[start], *high[dim + 1:]), where)
                for start in starts), dim)
    raise MoekitError(f"{where}: its chunks do not tile it (they leave a gap or overlap); "
                      "moekit reads tensors saved whole or in blocks that tile them, as "
                      "DTensor shards do")


def _tensor(tensor: Chunked) -> TensorInfo:
    """Where the bytes of a tensor saved whole or in row chunks lie: one run, or one run
    per row chunk."""
    key, shape, dtype = tensor.key, tensor.shape, tensor.dtype
    chunks = _row_chunks(tensor.chunks, shape, tensor.where)
    runs = tuple(TensorInfo(key, *tensor.run(chunk, dtype)) for chunk in chunks)
    if len(runs) == 1:
        return runs[0]
    first = next((run for run in runs if run.shape[0]), runs[0])
    return TensorInfo(key, first.file, shape, dtype, first.offset, chunks=runs)


def _row_chunks(chunks: Sequence[ChunkLike], shape: tuple[int, ...], where: str
                ) -> list[ChunkLike]:
    """The chunks of a tensor in row order, once they are known to tile it by rows: each
    whole in every dimension but the first, one after another from row 0 to the last."""
    if len(chunks) == 1 and not any(chunks[0].offsets) and tuple(chunks[0].sizes) == shape:
        return chunks
    ordered = sorted(chunks, key=lambda chunk: tuple(chunk.offsets))
    row = 0
    for chunk in ordered:
        if not shape or (tuple(chunk.offsets), tuple(chunk.sizes)[1:]) != (
                (row, *[0] * (len(shape) - 1)), shape[1:]):
            raise MoekitError(f"{where} is saved in {len(chunks)} row chunks that leave a gap "
                              "or overlap")
        row += chunk.sizes[0]
    if row != shape[0]:
        raise MoekitError(f"{where}: its chunks hold {row} of its {shape[0]} rows")
    return ordered
