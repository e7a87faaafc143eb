"""Evaluating recipes into tensors.

Recipes are evaluated into a preallocated destination ("destination passing"): a Stack
fills ``out[i]``, a Concat fills narrowed views, a Transpose fills the transposed view, and
each Read is copied straight into its place. Peak memory is the destination tensor plus
one source region, whatever the number of experts.

Random draws are made on the CPU from generators seeded by the recipe, so a plan gives
the same tensors on every run, device and expert-parallel rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch

from ..dtypes import to_torch
from ..errors import MoekitError
from ..plan import (FP4_VALUES, Cast, Concat, Constant, Dequantize, DequantizeMXFP4, Expr,
                    Random, Read, Redraw, RequireEqual, RequireZeros, Reshape, Scale, Stack,
                    Transpose, handler)
from ..sources import TensorSource


def materialize(expr: Expr, source: TensorSource, device: torch.device | str | None = None
                ) -> torch.Tensor:
    """The tensor a recipe describes. A whole-tensor read is returned as the source gives it
    (moved to ``device`` if it lies elsewhere)."""
    if isinstance(expr, Read) and expr.is_whole:
        tensor = source.read(expr)
        return tensor if device is None else tensor.to(device)
    out = torch.empty(expr.shape, dtype=to_torch(expr.dtype), device=device)
    fill(expr, out, source)
    return out


MOVED_AS = {torch.bool: torch.uint8}
"""Dtypes whose elements are moved as another dtype of the same width: torch normalises a
bool element when it copies it (a byte 2 becomes 1), so bool bytes move as uint8."""


class _Viewed:
    """A source whose reads are viewed as another dtype of the same width."""

    def __init__(self, source: TensorSource, dtype: torch.dtype) -> None:
        self.source = source
        self.dtype = dtype

    def read(self, region: Read) -> torch.Tensor:
        return self.source.read(region).view(self.dtype)


def fill(expr: Expr, out: torch.Tensor, source: TensorSource) -> None:
    """Write the value of ``expr`` into ``out`` (a tensor or view of ``expr``'s shape),
    byte for byte (see ``MOVED_AS``)."""
    moved = MOVED_AS.get(out.dtype)
    if moved is not None:
        out, source = out.view(moved), _Viewed(source, moved)
    handler(_FILLERS, expr, "the torch executor")(expr, out, source)


def _fill_read(expr: Read, out: torch.Tensor, source: TensorSource) -> None:
    out.copy_(_checked(source.read(expr), expr, out))


def _fill_transpose(expr: Transpose, out: torch.Tensor, source: TensorSource) -> None:
    fill(expr.part, out.transpose(-2, -1), source)


def _fill_scale(expr: Scale, out: torch.Tensor, source: TensorSource) -> None:
    fill(expr.part, out, source)
    out.mul_(expr.factor)


def _fill_cast(expr: Cast, out: torch.Tensor, source: TensorSource) -> None:
    out.copy_(materialize(expr.part, source, out.device))


def _fill_constant(expr: Constant, out: torch.Tensor, source: TensorSource) -> None:
    out.fill_(expr.value)


def _fill_require_zeros(expr: RequireZeros, out: torch.Tensor, source: TensorSource) -> None:
    """Fill ``out`` with the part once the checked tensor is all zero bits: a -0.0 is
    refused too, since the zeros written back in its place would not give it back."""
    if torch.count_nonzero(_as_bits(materialize(expr.checked, source, out.device))).item():
        raise MoekitError(f"{expr.name} holds non-zero values (bit for bit: -0.0 "
                          f"counts): {expr.reason}, so moekit refuses to drop it")
    fill(expr.part, out, source)


def _fill_require_equal(expr: RequireEqual, out: torch.Tensor, source: TensorSource) -> None:
    """Fill ``out`` with the part, then compare the copy's bytes with it (elements as
    integers of their width: NaN payloads and the sign of zero count)."""
    fill(expr.part, out, source)
    copy = materialize(expr.copy, source, out.device)
    # The plan's dtypes, not the tensors': bool elements are moved as uint8 (MOVED_AS).
    if expr.copy.dtype != expr.part.dtype or copy.shape != out.shape or not torch.equal(
            _as_bits(copy), _as_bits(out)):
        kept, dropped = expr.names
        raise MoekitError(f"{dropped} differs from {kept}: {expr.reason}, so moekit refuses "
                          f"to drop {dropped}")


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The elements of ``tensor`` as signed integers of their width (bytes where there is
    none of that width)."""
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(
        tensor.element_size(), torch.uint8)
    return _values(tensor).contiguous().view(bits)


def element_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor``'s elements in row-major order, as a flat uint8 tensor on the
    CPU (what a safetensors file holds of it)."""
    return _values(tensor.detach().cpu()).contiguous().reshape(-1).view(torch.uint8)


def _values(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the negation or conjugation that torch keeps lazy (``x._neg_view()``,
    ``z.conj().imag``) applied, so that its bytes are its values' (torch refuses to view
    such a tensor as another dtype)."""
    return tensor.resolve_conj().resolve_neg()


def _fill_random(expr: Random, out: torch.Tensor, source: TensorSource) -> None:
    out.copy_(normal(expr.shape, expr.seed) * expr.std)


def _checked(value: torch.Tensor, read: Read, out: torch.Tensor) -> torch.Tensor:
    """``value`` once it has the shape and dtype of its place: ``copy_`` would broadcast a
    smaller tensor or round another dtype without a word (a source changed after its plan
    was made)."""
    if value.shape != out.shape or value.dtype != out.dtype:
        raise _misfit(read, tuple(value.shape), value.dtype, out)
    return value


def _misfit(read: Read, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor
            ) -> MoekitError:
    return MoekitError(f"{read.key} gave {list(shape)} {dtype} where the plan expects "
                       f"{list(out.shape)} {out.dtype}; was the tensor changed after the plan "
                       "was made?")


def _fill_reshape(expr: Reshape, out: torch.Tensor, source: TensorSource) -> None:
    """Fill ``out`` through a view of the part's shape where ``out`` is contiguous (an
    expert's MXFP4 blocks, [out, in/32, 16] <-> [out, in/2]); else fill the part alone and
    copy it in (Megatron-Core's QKV: each projection's rows by query group, [G, R, H],
    concatenated along the rows of a group)."""
    if out.is_contiguous():
        fill(expr.part, out.view(expr.part.shape), source)
        return
    part = torch.empty(expr.part.shape, dtype=out.dtype, device=out.device)
    fill(expr.part, part, source)
    out.copy_(part.view(out.shape))


def _fill_stack(expr: Stack, out: torch.Tensor, source: TensorSource) -> None:
    """Stack the parts into ``out``. A stack of (transposed) regions of one staging buffer
    is gathered in one kernel rather than one copy per expert, and a stack of equally built
    concatenations one concatenated piece at a time (``out[:, ..., piece k]``): gathered
    likewise, or else filled piece by piece."""
    parts = expr.parts
    first = parts[0]
    if isinstance(first, Concat) and _alike_concats(first, parts):
        columns = list(zip(*(part.parts for part in parts)))  # piece k of every part
        views = _piece_views(first, out)
        if _gather_into(columns, views, source):
            return
        if _equal_concats(first, parts):
            for column, view in zip(columns, views):
                fill(Stack(column), view, source)
            return
    if not _gather_into([parts], [out], source):
        for i, part in enumerate(parts):
            fill(part, out[i], source)


def _alike_concats(first: Concat, parts: tuple[Expr, ...]) -> bool:
    """True when every part is a concatenation of as many pieces as ``first``, along the
    same dimension, interleaved as ``first`` is or not."""
    dim, interleave, count = first.dim, first.interleave, len(first.parts)
    return all(isinstance(part, Concat) and part.dim == dim and part.interleave == interleave
               and len(part.parts) == count for part in parts)


def _equal_concats(first: Concat, parts: tuple[Expr, ...]) -> bool:
    """True when the pieces of every part (concatenations alike, ``_alike_concats``) have
    the shapes of ``first``'s."""
    shapes = [piece.shape for piece in first.parts]
    return all([piece.shape for piece in part.parts] == shapes for part in parts)


def _piece_views(first: Concat, out: torch.Tensor) -> list[torch.Tensor]:
    """The views ``out[:, ..., piece k]`` of a stack of concatenations built as ``first``."""
    dim = first.dim % len(first.shape)
    if first.interleave:
        count = len(first.parts)
        return [out[(slice(None),) * (dim + 1) + (slice(k, None, count),)]
                for k in range(count)]
    views, offset = [], 0
    for piece in first.parts:
        size = piece.shape[dim]
        views.append(out.narrow(dim + 1, offset, size))
        offset += size
    return views


def _gather_into(stacks: list[tuple[Expr, ...]], outs: list[torch.Tensor],
                 source: TensorSource) -> bool:
    """Fill each of ``outs`` with its stack of parts gathered from the source's buffer
    (``_gather``) when every stack can be; else fill nothing and return False."""
    if not isinstance(source, LocatingSource):
        return False
    gathered = [_gather(parts, source) for parts in stacks]
    if any(found is None for found in gathered):
        return False
    for (pieces, read), out in zip(gathered, outs):
        _checked_pieces(pieces, read, out)
        for first, stacked in pieces:
            out.narrow(0, first, stacked.shape[0]).copy_(stacked)
    return True


def _checked_pieces(pieces: list[tuple[int, torch.Tensor]], read: Read, out: torch.Tensor
                    ) -> None:
    """``_checked`` for a stack in pieces (``stacked_regions``), whose pieces follow each
    other and hold regions of one shape and dtype."""
    last, stacked = pieces[-1]
    shape = (last + len(stacked), *stacked.shape[1:])
    if shape != out.shape or stacked.dtype != out.dtype:
        raise _misfit(read, shape, stacked.dtype, out)


@runtime_checkable
class LocatingSource(Protocol):
    """A source whose regions lie in one buffer it can point into (the device executor's
    staging buffer), so that a stack of them is gathered without a copy per part."""

    def read(self, region: Read) -> torch.Tensor:
        """The region, as a view of the buffer."""

    def locate(self, regions: list[Read]
               ) -> tuple[torch.Tensor, list[int], tuple[int, ...]] | None:
        """(the buffer as the regions' dtype, each one's element offset, their shape) of
        equally shaped regions of whole rows of one dtype; None for other regions."""


def _gather(parts: tuple[Expr, ...], source: LocatingSource
            ) -> tuple[list[tuple[int, torch.Tensor]], Read] | None:
    """Stacked parts that are all reads (or all transposed reads) of equally shaped
    regions of the source's buffer, as ``stacked_regions`` gives them (each run of the
    stack a view, or one gather), with the first read (to name it); None for other
    parts."""
    kinds = {type(part) for part in parts}
    if kinds == {Transpose}:
        regions = [part.part for part in parts]
        if {type(region) for region in regions} != {Read}:
            return None
    elif kinds == {Read}:
        regions = list(parts)
    else:
        return None
    spots = source.locate(regions)
    if spots is None:
        return None
    return stacked_regions(*spots, transposed=kinds == {Transpose}), regions[0]


def stacked_regions(base: torch.Tensor, starts: list[int], shape: tuple[int, ...],
                    transposed: bool = False) -> list[tuple[int, torch.Tensor]]:
    """The regions of ``shape`` at element offsets ``starts`` of the flat ``base``,
    stacked (each with its last two dimensions swapped, if ``transposed``), in pieces:
    (position in the stack of the piece's first region, the piece).
    A run of regions whose offsets step evenly (by a region or more) is a view, one piece;
    where there are more than ``_most_runs(len(starts))`` runs, the stack is one piece
    gathered by an ``index_select``.

    Files order a layer's experts by name (``experts.10`` before ``experts.2``), so they
    seldom lie at one stride, but mostly in a few runs that do (``20`` to ``29``; 15 runs
    for 128 experts, 29 for 256). A copy per run writes each byte once, where a gather
    writes it twice (into a gathered copy, then into place), and its kernel is loaded
    into a process that needs a copy anyway: on an H200 host, the first ``index_select``
    in a process took 45 to 90 ms to load its kernels."""
    numel = math.prod(shape)
    runs = _runs(starts, max(numel, 1))
    if len(runs) > _most_runs(len(starts)):
        windows = base.as_strided((base.numel() - numel + 1, numel), (1, 1), 0)
        gathered = windows.index_select(0, _on_device(starts, base.device))
        stacked = gathered.view(len(starts), *shape)
        return [(0, stacked.transpose(-2, -1) if transposed else stacked)]
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    if transposed:
        shape = (*shape[:-2], shape[-1], shape[-2])
        strides[-2:] = strides[-1], strides[-2]
    as_strided = base.as_strided
    return [(first, as_strided((count, *shape), (step, *strides), starts[first]))
            for first, count, step in runs]


def _most_runs(regions: int) -> int:
    """The most runs a stack of ``regions`` regions is copied in, run by run, rather than
    gathered: a quarter of them, and at least 8."""
    return max(8, regions // 4)


def _runs(starts: list[int], least: int) -> list[tuple[int, int, int]]:
    """(first position, count, step) of each run of ``starts`` that steps evenly by
    ``least`` or more (a region alone is a run of one)."""
    runs: list[tuple[int, int, int]] = []
    first, count = 0, len(starts)
    while first < count:
        end, step = first + 1, least
        if end < count and starts[end] - starts[first] >= least:
            step = starts[end] - starts[first]
            while end < count and starts[end] - starts[end - 1] == step:
                end += 1
        runs.append((first, end - first, step))
        first = end
    return runs


_COPIES_LOADED: set[tuple[torch.device, torch.dtype]] = set()
"""(device, dtype) whose copy from a transposed view this process has launched."""


def load_copy_kernels(device: torch.device, dtypes: Iterable[str]) -> None:
    """Copy a few elements of each of ``dtypes`` (moved as ``MOVED_AS`` says) from a
    transposed view on ``device``, on its current stream, unless this process has done so
    for that device and dtype.

    CUDA loads a kernel into the process at its first launch, and this copy builds most
    grouped tensors (the experts' stacks, transposed): on an H200 host, loading it took
    10 to 30 ms. The device executor calls this once the reads of its first batches are
    all queued, so that the kernel is loaded while they run, neither after them nor
    before the later ones are queued."""
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    for name in dtypes:
        dtype = to_torch(name)
        dtype = MOVED_AS.get(dtype, dtype)
        if (device, dtype) not in _COPIES_LOADED:
            _COPIES_LOADED.add((device, dtype))
            transposed = torch.empty((3, 2), dtype=dtype, device=device).t()
            try:
                torch.empty((2, 3), dtype=dtype, device=device).copy_(transposed)
            except RuntimeError:  # a dtype torch has no such copy for: the load makes none
                pass


def _on_device(values: Sequence[float], device: torch.device,
               dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``values`` (a gather's index, the FP4 table) as a ``dtype`` tensor on ``device``,
    queued on CUDA as a copy from page-locked memory: a copy from pageable memory returns
    only once the stream has run all its queued work (in the device executor, the batch's
    reads and the gathers before it), which would leave the thread that queues the next
    batch's work waiting behind every gather or dequantisation. Gathers are the usual case:
    safetensors files order tensors by name (``experts.10`` before ``experts.2``), so a
    layer's experts seldom lie at one stride."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _fill_concat(expr: Concat, out: torch.Tensor, source: TensorSource) -> None:
    dim = expr.dim % out.dim()
    n = len(expr.parts)
    offset = 0
    for k, part in enumerate(expr.parts):
        if expr.interleave:
            index = (slice(None),) * dim + (slice(k, None, n),)
            fill(part, out[index], source)
        else:
            size = part.shape[dim]
            fill(part, out.narrow(dim, offset, size), source)
            offset += size


def _fill_dequantize(expr: Dequantize, out: torch.Tensor, source: TensorSource) -> None:
    weight = materialize(expr.weight, source, out.device).float()
    scale = materialize(expr.scale, source, out.device).float()
    rows, cols = weight.shape[-2:]
    full = scale.index_select(-2, _block_index(rows, expr.block[0], out.device))
    full = full.index_select(-1, _block_index(cols, expr.block[1], out.device))
    out.copy_(weight * full)


def _block_index(size: int, block: int, device: torch.device) -> torch.Tensor:
    """For each of ``size`` positions, the block of ``block`` positions it lies in (work
    bounded by the weight, whatever block size a config declares)."""
    return torch.div(torch.arange(size, device=device), block, rounding_mode="floor")


def _fill_mxfp4(expr: DequantizeMXFP4, out: torch.Tensor, source: TensorSource) -> None:
    """Look the FP4 codes up in ``out``'s dtype, then scale by 2^(e - 127) with ``ldexp``
    (exact for powers of two), as transformers' reference does."""
    blocks = materialize(expr.blocks, source, out.device)
    exponents = materialize(expr.scales, source, out.device).to(torch.int32) - 127
    table = _on_device(FP4_VALUES, out.device, out.dtype)
    values = torch.empty((*blocks.shape, 2), dtype=out.dtype, device=out.device)
    values[..., 0] = table[(blocks & 0x0F).int()]
    values[..., 1] = table[(blocks >> 4).int()]
    values = values.view(*blocks.shape[:-1], -1)
    torch.ldexp(values, exponents.unsqueeze(-1), out=values)
    out.copy_(values.view(out.shape))


def normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal float32 draws on the CPU, determined by ``seed`` alone."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def redrawn_indices(size: int, ratio: float, seed: int) -> torch.Tensor:
    """The sorted indices, ``round(ratio * size)`` of ``range(size)``, that ``seed`` picks."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:round(ratio * size)].sort().values


def _fill_redraw(expr: Redraw, out: torch.Tensor, source: TensorSource) -> None:
    fill(expr.part, out, source)
    dim = expr.dim % out.dim()
    index = redrawn_indices(expr.shape[dim], expr.ratio, expr.select_seed)
    mean, std = _statistics(source, expr.stats)
    shape = list(expr.shape)
    shape[dim] = len(index)
    noise = normal(tuple(shape), expr.noise_seed) * std + mean
    out.index_copy_(dim, index.to(out.device), noise.to(out.device, out.dtype))


@runtime_checkable
class StatisticsSource(Protocol):
    """A source that keeps the statistics of the regions redraws read, for the job it
    serves (every expert of a layer redraws from the same dense weight's statistics)."""

    def read(self, region: Read) -> torch.Tensor:
        """The region."""

    def statistics(self, region: Read) -> tuple[float, float]:
        """Mean and standard deviation of the region, in float32."""


class KeepingStatistics:
    """``source``, keeping the statistics of what redraws read (``StatisticsSource``) for
    as long as this object lives: one job."""

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self._known: dict[str | tuple[str, str], tuple[float, float]] = {}

    def read(self, region: Read) -> torch.Tensor:
        return self.source.read(region)

    def statistics(self, region: Read) -> tuple[float, float]:
        if region.ident not in self._known:
            self._known[region.ident] = _statistics(self.source, region)
        return self._known[region.ident]


def _statistics(source: TensorSource, stats: Read) -> tuple[float, float]:
    """Mean and standard deviation of a source region, in float32 (kept by a
    ``StatisticsSource``, computed again by any other)."""
    if isinstance(source, StatisticsSource):
        return source.statistics(stats)
    std, mean = torch.std_mean(source.read(stats).float())
    return mean.item(), std.item()

_FILLERS = {
    Read: _fill_read, Transpose: _fill_transpose, Reshape: _fill_reshape, Stack: _fill_stack,
    Concat: _fill_concat, Scale: _fill_scale, Constant: _fill_constant, Random: _fill_random,
    Redraw: _fill_redraw, Dequantize: _fill_dequantize, DequantizeMXFP4: _fill_mxfp4,
    RequireZeros: _fill_require_zeros, RequireEqual: _fill_require_equal, Cast: _fill_cast,
}
"""One filler per recipe node: the one place this executor dispatches on a node's type."""
