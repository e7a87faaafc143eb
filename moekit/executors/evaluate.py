"""Evaluating recipes into tensors.

Recipes are evaluated into a preallocated destination ("destination passing"): a Stack
fills ``out[i]``, a Concat fills narrowed views, a Transpose fills the transposed view, and
each Read is copied straight into its place. Peak memory is the destination tensor plus
one source region, whatever the number of experts.
"""

from __future__ import annotations

import torch

from ..dtypes import to_torch
from ..plan import Concat, Expr, Read, Stack, Transpose
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
        for i, part in enumerate(expr.parts):
            fill(part, out[i], source)
    elif isinstance(expr, Concat):
        _fill_concat(expr, out, source)
    else:
        raise TypeError(f"not a recipe node: {expr!r}")


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
