"""Evaluating recipes into tensors.

Recipes are evaluated into a preallocated destination ("destination passing"): a Stack
fills ``out[i]``, a Concat fills narrowed views, a Transpose fills the transposed view, and
each Read is copied straight into its place. Peak memory is the destination tensor plus
one source region, whatever the number of experts.

Random draws are made on the CPU from generators seeded by the recipe, so a plan gives
the same tensors on every run, device and expert-parallel rank.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch

from ..dtypes import to_torch

from ..plan import Concat, Constant, Expr, Random, Read, Redraw, Scale, Stack, Transpose
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


def fill(expr: Expr, out: torch.Tensor, source: TensorSource) -> None:
    """Write the value of ``expr`` into ``out`` (a tensor or view of ``expr``'s shape)."""
    if isinstance(expr, Read):
        out.copy_(source.read(expr))
    elif isinstance(expr, Transpose):
        fill(expr.part, out.transpose(-2, -1), source)
    elif isinstance(expr, Stack):
        _fill_stack(expr, out, source)
    elif isinstance(expr, Concat):
        _fill_concat(expr, out, source)
    elif isinstance(expr, Scale):
        fill(expr.part, out, source)
        out.mul_(expr.factor)
    elif isinstance(expr, Constant):
        out.fill_(expr.value)
    elif isinstance(expr, Random):
        out.copy_(normal(expr.shape, expr.seed) * expr.std)
    elif isinstance(expr, Redraw):
        _fill_redraw(expr, out, source)
    else:
        raise TypeError(f"not a recipe node: {expr!r}")


def _fill_stack(expr: Stack, out: torch.Tensor, source: TensorSource) -> None:
    """Stack the parts into ``out``. A stack of equally built concatenations is filled one
    concatenated piece at a time (``out[:, ..., piece k]``), and a stack of (transposed)
    regions that share one buffer (the device executor's staging) is gathered in one
    kernel rather than one copy per expert."""
    parts = expr.parts
    first = parts[0]
    if isinstance(first, Concat) and all(_same_concat(first, p) for p in parts):
        dim = first.dim % len(first.shape)
        offset = 0
        for k, piece in enumerate(first.parts):
            size = piece.shape[dim]
            index = slice(k, None, len(first.parts)) if first.interleave else \
                slice(offset, offset + size)
            fill(Stack(tuple(p.parts[k] for p in parts)), out[(slice(None),) * (dim + 1) + (index,)],
                 source)
            offset += size
        return
    transposed = isinstance(first, Transpose)
    leaves = [p.part if isinstance(p, Transpose) else p for p in parts]
    if not all(isinstance(p, Transpose) == transposed and isinstance(leaf, Read)
               for p, leaf in zip(parts, leaves)):
        for i, part in enumerate(parts):
            fill(part, out[i], source)
        return
    tensors = [source.read(leaf) for leaf in leaves]
    gathered = _gather(tensors)
    if gathered is not None:
        out.copy_(gathered.transpose(-2, -1) if transposed else gathered)
        return
    for i, tensor in enumerate(tensors):
        out[i].copy_(tensor.transpose(-2, -1) if transposed else tensor)


def _same_concat(a: Concat, b: Expr) -> bool:
    return (isinstance(b, Concat) and b.dim == a.dim and b.interleave == a.interleave
            and [p.shape for p in b.parts] == [p.shape for p in a.parts])


def _gather(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors stacked, gathered by one ``index_select`` over a sliding-window view of
    the buffer they all lie in, or None unless they are equally shaped contiguous views of
    one storage."""
    first = tensors[0]
    storage = first.untyped_storage()
    if not all(t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype
               and t.untyped_storage().data_ptr() == storage.data_ptr() for t in tensors):
        return None
    length = storage.nbytes() // first.element_size()
    windows = first.as_strided((length - first.numel() + 1, first.numel()), (1, 1), 0)
    starts = torch.tensor([t.storage_offset() for t in tensors], device=first.device)
    return windows.index_select(0, starts).view(len(tensors), *first.shape)


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


_STATISTICS: WeakKeyDictionary = WeakKeyDictionary()


def _statistics(source: TensorSource, stats: Read) -> tuple[float, float]:
    """Mean and standard deviation of a source region, in float32 (cached per source:
    every expert of a layer redraws from the same dense weight's statistics)."""
    known = _STATISTICS.setdefault(source, {})
    name = (stats.key, repr(stats.region))
    if name not in known:
        std, mean = torch.std_mean(source.read(stats).float())
        known[name] = (mean.item(), std.item())
    return known[name]
