"""Building recipes that only move bytes (read, stack, concatenate, interleave, transpose,
reshape) from checkpoint files into host memory with numpy, without torch.

A file-to-file conversion that moves bytes has no arithmetic to do, so it need not pay
for importing torch (which takes seconds); numpy copies release the GIL, so the
streaming executor runs this on every core at once. Elements are moved as unsigned
integers of their width, which copies every bit pattern exactly (bf16, fp8, bool and NaN
payloads included). Recipes with arithmetic (scales, draws, dequantisation) are built by
``evaluate`` with torch instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from ..dtypes import itemsize
from ..plan import Concat, Expr, Read, Reshape, Stack, Transpose, handler

TRANSPOSE_BLOCK_BYTES = 32
"""Bytes of each destination row one step of a transposed copy writes: numpy copies a
transposed view fastest in strips of source rows this many bytes wide (about 2.5 GB/s a
core for bf16 on a 2-core VM, 0.8 GB/s for the whole view in one assignment)."""


@runtime_checkable
class BlockSource(Protocol):
    """Where the bytes of source regions are read from (``moekit.sources.FileSource``)."""

    def block_bytes(self, region: Read) -> int:
        """Bytes of the run of elements that holds ``region``."""

    def read_block(self, region: Read, buffer: memoryview) -> tuple[tuple[int, ...], tuple]:
        """Read that run into ``buffer``; return its shape and the region within it."""


def element_dtype(dtype: str) -> np.dtype:
    """The numpy dtype elements of a safetensors ``dtype`` are moved as."""
    return np.dtype(f"u{itemsize(dtype)}")


def movable(expr: Expr) -> bool:
    """True when every node of the recipe only moves bytes (so ``fill`` can build it)."""
    if isinstance(expr, Read):
        return True
    if isinstance(expr, (Transpose, Reshape)):
        return movable(expr.part)
    if isinstance(expr, (Stack, Concat)):
        return all(movable(part) for part in expr.parts)
    return False


def fill(expr: Expr, out: np.ndarray, source: BlockSource) -> None:
    """Write the value of ``expr`` (a ``movable`` recipe) into ``out``, an array or view of
    its shape whose elements are those of ``element_dtype``. An empty ``out`` (a zero in
    its shape) has no bytes to write."""
    if out.size:
        handler(_FILLERS, expr, "the byte-moving executor")(expr, out, source)


def _fill_read(expr: Read, out: np.ndarray, source: BlockSource) -> None:
    """Read the region's bytes straight into ``out`` when it is the whole contiguous run,
    else into a scratch buffer copied into place."""
    size = source.block_bytes(expr)
    if out.flags.c_contiguous and out.nbytes == size:
        source.read_block(expr, memoryview(out).cast("B"))  # the region is the whole run
        return
    scratch = np.empty(size, dtype=np.uint8)
    shape, within = source.read_block(expr, memoryview(scratch))
    block = scratch.view(out.dtype).reshape(shape)
    copy_into(out, block[within] if within else block)


def copy_into(out: np.ndarray, value: np.ndarray) -> None:
    """``out[...] = value`` for arrays of one shape; when ``out`` is a transposed view
    (its last dimension not contiguous), in strips of ``value``'s rows that write
    ``TRANSPOSE_BLOCK_BYTES`` of each destination row at a time."""
    if out.shape != value.shape:
        raise ValueError(f"a region of shape {list(value.shape)} cannot fill "
                         f"{list(out.shape)}")
    if out.ndim < 2 or out.strides[-1] == out.itemsize:
        out[...] = value
        return
    step = max(1, TRANSPOSE_BLOCK_BYTES // out.itemsize)
    for row in range(0, out.shape[-2], step):
        out[..., row:row + step, :] = value[..., row:row + step, :]


def _fill_transpose(expr: Transpose, out: np.ndarray, source: BlockSource) -> None:
    fill(expr.part, out.swapaxes(-1, -2), source)


def _fill_reshape(expr: Reshape, out: np.ndarray, source: BlockSource) -> None:
    """Fill ``out`` through a view of the part's shape, or through a scratch array where
    ``out``'s strides allow no such view."""
    try:
        view = np.reshape(out, expr.part.shape, copy=False)
    except ValueError:
        scratch = np.empty(expr.part.shape, dtype=out.dtype)
        fill(expr.part, scratch, source)
        copy_into(out, scratch.reshape(out.shape))
    else:
        fill(expr.part, view, source)


def _fill_stack(expr: Stack, out: np.ndarray, source: BlockSource) -> None:
    for i, part in enumerate(expr.parts):
        fill(part, out[i], source)


def _fill_concat(expr: Concat, out: np.ndarray, source: BlockSource) -> None:
    """Each part into its narrowed view of ``out`` (or, interleaved, every n-th position)."""
    dim = expr.dim % out.ndim
    lead = (slice(None),) * dim
    n, offset = len(expr.parts), 0
    for k, part in enumerate(expr.parts):
        if expr.interleave:
            fill(part, out[lead + (slice(k, None, n),)], source)
        else:
            size = part.shape[dim]
            fill(part, out[lead + (slice(offset, offset + size),)], source)
            offset += size


_FILLERS: dict[type, Callable[[Expr, np.ndarray, BlockSource], None]] = {
    Read: _fill_read, Transpose: _fill_transpose, Reshape: _fill_reshape, Stack: _fill_stack,
    Concat: _fill_concat,
}
"""One filler per node that only moves bytes; ``movable`` accepts exactly these."""
