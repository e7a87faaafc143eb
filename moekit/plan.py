"""Plans: pure data describing how every destination tensor is made from source tensors.

A plan is built from safetensors headers alone. Each destination tensor has a recipe, a
small expression tree whose leaves are reads of source tensor regions and whose inner
nodes are exact data movements (stack, concatenate, interleave, transpose) or, for
upcycling and merging, the few value changes they need (scale, seeded random draws, a
dtype cast). Shapes and
dtypes are known for every node, so a whole plan can be validated and shown before any
tensor byte is read. Executors (``moekit.executors``) turn recipes into tensors.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, NamedTuple, Protocol, TypeVar, Union

from .dtypes import itemsize
from .errors import MoekitError
from .sizes import format_size

Index = Union[int, slice]


class Read(NamedTuple):
    """A region of one source tensor: ``source[key][region]``.

    ``region`` indexes the leading dimensions (ints drop a dimension, slices keep it);
    dimensions it does not mention are read whole.

    A named tuple, immutable like the other nodes and made in less than half their time: a
    plan has a read for every tensor of the source (over ninety thousand for DeepSeek-V3).
    """

    key: str
    region: tuple[Index, ...]
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def whole(cls, key: str, meta: "TensorMeta") -> "Read":
        """The whole tensor ``key``, whose header (or tensor) is ``meta``: made as a tuple in
        C (a named tuple's own ``__new__`` is Python), since a parse makes one for every
        expert weight of a checkpoint."""
        return tuple.__new__(cls, (key, (), tuple(meta.shape), meta.dtype))

    @property
    def is_whole(self) -> bool:
        """True when the read covers the full source tensor."""
        return not self.region

    @property
    def ident(self) -> str | tuple[str, str]:
        """A hashable identity: the key of a whole tensor, else the key and the region
        (slices are not hashable before Python 3.12)."""
        return (self.key, repr(self.region)) if self.region else self.key


class TensorMeta(Protocol):
    """What a plan needs to know of a source tensor: a header entry or a tensor."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Transpose:
    """Swap the last two dimensions (``[out, in] <-> [in, out]``)."""

    part: "Expr"

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.part.shape
        return (*s[:-2], s[-1], s[-2])

    @property
    def dtype(self) -> str:
        return self.part.dtype


@dataclass(frozen=True)
class Reshape:
    """The same elements in row-major order under another shape (vLLM holds MXFP4 blocks
    [out, in/32, 16] as [out, in/2]): a view, no value changes."""

    part: "Expr"
    shape: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.part.dtype


@dataclass(frozen=True)
class Stack:
    """Stack equally shaped parts along a new leading dimension."""

    parts: tuple["Expr", ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype


@dataclass(frozen=True)
class Concat:
    """Concatenate parts along ``dim`` (``interleave=False``: one after another), or
    interleave them element by element along ``dim`` (``interleave=True``: part k fills
    positions ``k::len(parts)``, as GPT-OSS stores gate and up)."""

    parts: tuple["Expr", ...]
    dim: int
    interleave: bool = False

    @cached_property
    def shape(self) -> tuple[int, ...]:
        """Kept once computed: a tensor stored in blocks is a concatenation of thousands of
        nested ones, whose shape every part read of it asks for."""
        first = list(self.parts[0].shape)
        first[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return tuple(first)

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """Where each part starts along ``dim``, and where the last ends (not interleaved)."""
        return tuple(itertools.accumulate((p.shape[self.dim] for p in self.parts), initial=0))

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype


class _ShapedLikePart:
    """A node whose shape and dtype are its ``part``'s (it changes values only)."""

    part: "Expr"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.part.shape

    @property
    def dtype(self) -> str:
        return self.part.dtype


@dataclass(frozen=True)
class Scale(_ShapedLikePart):
    """Multiply a part by a constant (computed in float32, rounded once to the dtype)."""

    part: "Expr"
    factor: float


@dataclass(frozen=True)
class Constant:
    """A tensor filled with one value (e.g. a zero router)."""

    shape: tuple[int, ...]
    dtype: str
    value: float = 0.0


@dataclass(frozen=True)
class Random:
    """Draws from N(0, std²), reproducible from ``seed`` alone (a fresh generator each
    time, so the same node always gives the same tensor)."""

    shape: tuple[int, ...]
    dtype: str
    std: float
    seed: int


@dataclass(frozen=True)
class Redraw(_ShapedLikePart):
    """Drop-Upcycling: a part whose slices ``ratio`` of the way along ``dim`` (a random
    subset chosen by ``select_seed``) are redrawn from N(mean, std²) of the tensor
    ``stats`` reads, with noise from ``noise_seed``. Projections that share a
    ``select_seed`` redraw the same neurons."""

    part: "Expr"
    dim: int
    ratio: float
    select_seed: int
    noise_seed: int
    stats: Read


@dataclass(frozen=True)
class Dequantize:
    """FP8 block dequantisation (DeepSeek-V3 ``weight_scale_inv``): ``weight * scale``
    where ``scale[i, j]`` covers rows ``i*block[0] ...`` and columns ``j*block[1] ...`` of
    the [out, in] weight (the last blocks may be partial); computed in float32 and rounded
    once to ``dtype``."""

    weight: "Expr"
    scale: "Expr"
    dtype: str = "BF16"
    block: tuple[int, int] = (128, 128)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape


@dataclass(frozen=True)
class RequireZeros(_ShapedLikePart):
    """``part``, once the source tensor ``checked`` is read and found to hold only zeros:
    how a tensor that the destination has no place for (torchtitan's ``expert_bias_E``
    on the way to HF) is dropped only when dropping it loses nothing. Evaluating it
    raises a MoekitError naming ``checked`` otherwise."""

    part: "Expr"
    checked: "Expr"
    """A read of the tensor, or where the checkpoint stores it in pieces, the concatenation
    of reads of them."""
    reason: str
    """Why the destination has no place for ``checked`` (for the error)."""
    name: str = ""
    """The checked tensor's key, as errors name it (by default the key ``checked`` reads);
    kept when ``checked`` becomes the concatenation of its pieces."""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.checked.key)


@dataclass(frozen=True)
class RequireEqual(_ShapedLikePart):
    """``part``, once ``copy`` is evaluated and found to hold the same bytes: how a source
    tensor that the destination keeps only as the tensor ``part`` makes (DeepSeek-V3's
    multi-token-prediction layer's own embedding and output head, which Megatron-Core's
    MTP block takes from the main model) is dropped only when dropping it loses nothing.
    Evaluating it raises a MoekitError naming both tensors otherwise."""

    part: "Expr"
    copy: "Expr"
    names: tuple[str, str]
    """The source names of the tensor kept and of its copy (for the error)."""
    reason: str
    """Why the destination holds the copy only as the kept tensor (for the error)."""


@dataclass(frozen=True)
class Cast:
    """``part`` converted to ``dtype`` as ``Tensor.to`` converts it (round to nearest
    even): what a merge's ``dtype`` asks of every tensor, applied after any ``Scale`` of
    the part, in that order as mergekit-moe applies them."""

    part: "Expr"
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.part.shape


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The 16 values of an FP4 (E2M1) code."""


@dataclass(frozen=True)
class DequantizeMXFP4:
    """MXFP4 (OCP microscaling, GPT-OSS Hub files) to ``dtype``: ``blocks`` [out, G, 16]
    uint8 hold two FP4 codes a byte (low nibble first) for 32 inputs per group, ``scales``
    [out, G] uint8 an E8M0 exponent per group: value = FP4 x 2^(scale - 127)."""

    blocks: "Expr"
    scales: "Expr"
    dtype: str = "BF16"

    @property
    def shape(self) -> tuple[int, ...]:
        out, groups, pairs = self.blocks.shape
        return (out, groups * pairs * 2)


Expr = Union[Read, Transpose, Reshape, Stack, Concat, Scale, Constant, Random, Redraw,
             Dequantize, DequantizeMXFP4, RequireZeros, RequireEqual, Cast]


T = TypeVar("T")


def handler(table: Mapping[type, T], expr: Expr, interpreter: str) -> T:
    """The entry of ``table`` (an interpreter's dispatch table, node type -> function) for
    ``expr``'s node type; a TypeError naming the node and ``interpreter`` otherwise."""
    try:
        return table[type(expr)]
    except KeyError:
        raise TypeError(f"{type(expr).__name__} is not a recipe node {interpreter} evaluates: "
                        f"{expr!r}") from None


def composed(expr: Expr, made: Mapping[str, Expr]) -> Expr:
    """``expr`` with every read of a tensor named in ``made`` replaced by ``made[key]``,
    the recipe that makes that tensor: how a conversion of an upcycled model reads the
    dense one, and a conversion of a Megatron-Core checkpoint its stored chunks."""
    return handler(_COMPOSE, expr, "composing a plan with the recipes of its reads")(expr, made)


def composed_plan(plan: "Plan", made: Mapping[str, Expr]) -> "Plan":
    """``plan`` with every recipe ``composed`` with ``made``."""
    return replace(plan, tensors=[replace(t, recipe=composed(t.recipe, made))
                                  for t in plan.tensors])


def _read(expr: Read, made: Mapping[str, Expr]) -> Expr:
    """The recipe of the tensor read. A conversion from per-expert HF tensors (what every
    upcycling target and Megatron-Core checkpoint holds) reads each of them whole;
    upcycling reads slices of a dense MLP's projections, which a Megatron-Core checkpoint
    holds as one read of a stored chunk each, so that the slice is a read of that chunk;
    a grouped tensor that a DCP folder stores in blocks (``Concat`` of reads) is read in
    part by reading the blocks the part reaches (``region_of``)."""
    recipe = made[expr.key]
    if expr.is_whole:
        return recipe
    return region_of(recipe, expr.region, expr.key)


def region_of(recipe: Expr, region: tuple[Index, ...], key: str) -> Expr:
    """``recipe[region]`` as a recipe, for a read or a concatenation (not interleaved) of
    such recipes (the tensor ``key``, named in errors): the parts ``region`` reaches along
    the concatenated dimension, each read in part, concatenated again (a single part
    alone)."""
    if isinstance(recipe, Read):
        return Read(recipe.key, _within(recipe, region), _region_shape(recipe.shape, region),
                    recipe.dtype)
    if not isinstance(recipe, Concat) or recipe.interleave:
        raise TypeError(f"a plan reads {key} in part; no recipe node reads part of a "
                        f"recipe ({describe(recipe)})")
    dim = recipe.dim
    region = (*region, *[slice(None)] * (dim + 1 - len(region)))
    before, item, after = region[:dim], region[dim], region[dim + 1:]
    lows = recipe.starts
    if isinstance(item, int):
        at = checked_index(item, recipe.shape[dim])
        part = bisect.bisect_right(lows, at) - 1
        return region_of(recipe.parts[part], (*before, at - lows[part], *after), key)
    start, stop, step = item.indices(recipe.shape[dim])
    if step < 0:
        raise TypeError(f"a plan reads {key} backwards ({item}), which no plan does")
    picked = []
    for part, low, high in zip(recipe.parts, lows, lows[1:]):
        first = start if start >= low else start + -(-(low - start) // step) * step
        if first < min(high, stop):
            picked.append(region_of(part, (*before, slice(first - low, min(high, stop) - low,
                                                          step), *after), key))
    if not picked:  # the region holds nothing along ``dim``
        picked = [region_of(recipe.parts[0], (*before, slice(0, 0), *after), key)]
    kept = dim - sum(isinstance(index, int) for index in before)
    return picked[0] if len(picked) == 1 else Concat(tuple(picked), kept)


def _region_shape(shape: tuple[int, ...], region: tuple[Index, ...]) -> tuple[int, ...]:
    """The shape of ``region`` of a tensor of ``shape``."""
    region = (*region, *[slice(None)] * (len(shape) - len(region)))
    return tuple(len(range(*index.indices(size))) for index, size in zip(region, shape)
                 if isinstance(index, slice))


def checked_index(item: int, size: int) -> int:
    """The integer index ``item`` into a dimension of ``size``, counted from the end when
    negative (as torch and Python count); refused beyond the dimension, where reading on
    would return another tensor's bytes."""
    if not -size <= item < size:
        raise MoekitError(f"a plan reads index {item} of a dimension of {size}: no such row "
                          "(a moekit bug: please report it)")
    return item % size


def _within(outer: Read, region: tuple[Index, ...]) -> tuple[Index, ...]:
    """The region of ``outer``'s source tensor that ``region`` of the tensor ``outer``
    reads covers: ``source[result][region] == source[outer.region][region]``."""
    kept: list[tuple[int, int, int]] = []  # per dimension of outer's tensor: source dim, start, step
    composed: list[Index] = []
    for dim, item in enumerate(outer.region):
        composed.append(item)
        if isinstance(item, slice):
            start, _, step = item.indices(1 << 62)
            kept.append((dim, start, step))
    first_whole = len(outer.region)
    kept += [(first_whole + k, 0, 1) for k in range(len(outer.shape) - len(kept))]
    for (dim, start, step), item, size in zip(kept, region, outer.shape):
        if isinstance(item, int):
            value: Index = start + checked_index(item, size) * step
        else:
            low, high, by = item.indices(size)
            value = slice(start + low * step, start + high * step, by * step)
        if dim < len(composed):
            composed[dim] = value
        else:
            composed += [slice(None)] * (dim - len(composed)) + [value]
    return tuple(composed)


def _parts(expr: Stack | Concat, made: Mapping[str, Expr]) -> Expr:
    return replace(expr, parts=tuple(composed(part, made) for part in expr.parts))


def _part(expr: Transpose | Reshape | Scale | Cast, made: Mapping[str, Expr]) -> Expr:
    return replace(expr, part=composed(expr.part, made))


def _checked(expr: RequireZeros | Redraw, made: Mapping[str, Expr]) -> Expr:
    """A node with a part and a tensor read beside it (the zeros checked, the statistics
    drawn from). The statistics stay a read, of a stored tensor or a part of one; the
    zeros may be checked over the pieces a tensor is stored in."""
    read = expr.stats if isinstance(expr, Redraw) else expr.checked
    other = composed(read, made)
    if isinstance(expr, Redraw) and not isinstance(other, Read):  # stored in blocks
        raise MoekitError(f"{describe(expr)} reads {read.key}, which the checkpoint stores in "
                          f"pieces ({describe(other)}); convert the checkpoint to HF files "
                          "first (moekit convert SRC DST --to hf) and use those")
    field_name = "stats" if isinstance(expr, Redraw) else "checked"
    return replace(expr, part=composed(expr.part, made), **{field_name: other})


def _pair(expr: Dequantize | DequantizeMXFP4, made: Mapping[str, Expr]) -> Expr:
    first, second = ("weight", "scale") if isinstance(expr, Dequantize) else ("blocks", "scales")
    return replace(expr, **{name: composed(getattr(expr, name), made)
                            for name in (first, second)})


def _both(expr: RequireEqual, made: Mapping[str, Expr]) -> Expr:
    return replace(expr, part=composed(expr.part, made), copy=composed(expr.copy, made))


def _leaf(expr: Constant | Random, made: Mapping[str, Expr]) -> Expr:
    return expr


_COMPOSE: dict[type, Callable[..., Expr]] = {
    Read: _read, Stack: _parts, Concat: _parts, Transpose: _part, Reshape: _part,
    Scale: _part, Cast: _part, Constant: _leaf, Random: _leaf, Redraw: _checked,
    RequireZeros: _checked, RequireEqual: _both, Dequantize: _pair, DequantizeMXFP4: _pair,
}
"""Every recipe node, by how its reads are replaced."""


def reads(expr: Expr) -> list[Read]:
    """Every source read a recipe makes, in evaluation order."""
    found: list[Read] = []
    try:
        _READS[type(expr)](expr, found)
    except KeyError as missing:  # the walk looks nothing up but node types in _READS
        raise TypeError(f"{missing.args[0].__name__} is not a recipe node listing the reads "
                        "of a recipe evaluates") from None
    return found


def _part_reads(expr: Transpose | Reshape | Scale | Cast, found: list[Read]) -> None:
    _READS[type(expr.part)](expr.part, found)


def _parts_reads(expr: Stack | Concat, found: list[Read]) -> None:
    for part in expr.parts:
        kind = type(part)
        if kind is Read:  # the usual parts, taken without a call: plans hold tens of thousands
            found.append(part)
        elif kind is Transpose and type(part.part) is Read:
            found.append(part.part)
        else:
            _READS[kind](part, found)


def _fields_reads(*names: str) -> Callable[[Expr, list[Read]], None]:
    """Add the reads of a node's expressions ``names``, in that order."""
    def add(expr: Expr, found: list[Read]) -> None:
        for name in names:
            part = getattr(expr, name)
            _READS[type(part)](part, found)
    return add


_READS: dict[type, Callable[[Any, list[Read]], None]] = {
    Read: lambda expr, found: found.append(expr),
    Constant: lambda expr, found: None,
    Random: lambda expr, found: None,
    Redraw: _fields_reads("part", "stats"),
    RequireZeros: _fields_reads("part", "checked"),
    RequireEqual: _fields_reads("part", "copy"),
    Dequantize: _fields_reads("weight", "scale"),
    DequantizeMXFP4: _fields_reads("blocks", "scales"),
    **dict.fromkeys((Transpose, Reshape, Scale, Cast), _part_reads),
    **dict.fromkeys((Stack, Concat), _parts_reads),
}
"""Every recipe node, by how it adds the reads it makes to a list, in order: one list for
a whole recipe, since the device executor lists the reads of every recipe of a plan (tens
of thousands of nodes) before it reads a byte."""


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a tensor of this shape and dtype."""
    return math.prod(shape) * itemsize(dtype)


def describe(expr: Expr) -> str:
    """A one-line human description of a recipe, for ``--dry-run``."""
    return handler(_DESCRIBE, expr, "describing a recipe")(expr)


_DESCRIBE: dict[type, Callable[..., str]] = {
    Read: lambda expr: expr.key if expr.is_whole else f"{expr.key}[{_region(expr.region)}]",
    Transpose: lambda expr: f"T({describe(expr.part)})",
    Reshape: lambda expr: f"view({describe(expr.part)}, {list(expr.shape)})",
    Scale: lambda expr: f"{expr.factor:g}*{describe(expr.part)}",
    Constant: lambda expr: f"full({list(expr.shape)}, {expr.value:g})",
    Random: lambda expr: f"normal({list(expr.shape)}, std={expr.std:g}, seed={expr.seed})",
    DequantizeMXFP4: lambda expr: (f"mxfp4({describe(expr.blocks)}, {describe(expr.scales)}) "
                                   f"-> {expr.dtype}"),
    Dequantize: lambda expr: (f"dequant({describe(expr.weight)}, {describe(expr.scale)}) "
                              f"-> {expr.dtype}"),
    Cast: lambda expr: f"{describe(expr.part)} -> {expr.dtype}",
    RequireZeros: lambda expr: f"{describe(expr.part)} if {expr.name} == 0",
    RequireEqual: lambda expr: f"{describe(expr.part)} if == {describe(expr.copy)}",
    Redraw: lambda expr: (f"redraw({describe(expr.part)}, {expr.ratio:.0%} of dim {expr.dim}, "
                          f"seed={expr.select_seed})"),
    Stack: lambda expr: f"stack({_described_parts(expr)})",
    Concat: lambda expr: (f"{'interleave' if expr.interleave else 'cat'}"
                          f"({_described_parts(expr)}, dim={expr.dim})"),
}
"""Every recipe node, by how ``--dry-run`` shows it."""


def _described_parts(expr: Stack | Concat) -> str:
    return _summarise_parts([describe(part) for part in expr.parts])


def _summarise_parts(parts: list[str]) -> str:
    if len(parts) <= 3:
        return ", ".join(parts)
    return f"{parts[0]}, ... {len(parts) - 2} more ..., {parts[-1]}"


def _region(region: tuple[Index, ...]) -> str:
    def one(i: Index) -> str:
        if isinstance(i, int):
            return str(i)
        start = "" if i.start is None else str(i.start)
        stop = "" if i.stop is None else str(i.stop)
        step = "" if i.step in (None, 1) else f":{i.step}"
        return f"{start}:{stop}{step}"

    return ", ".join(one(i) for i in region)


@dataclass(frozen=True)
class Chunk:
    """Where a destination tensor lies in a larger one that its checkpoint stores in chunks
    (Megatron-Core stacks a layer's tensors over the layers, and its experts' over the
    layers and experts, each layer's or expert's part one chunk): the stored tensor's name
    and whole shape, and this chunk's offset in it."""

    key: str
    offsets: tuple[int, ...]
    whole: tuple[int, ...]


@dataclass(frozen=True)
class TensorPlan:
    """One destination tensor and the recipe that makes it."""

    name: str
    recipe: Expr
    chunk: Chunk | None = None
    """Where the tensor lies in a tensor stored in chunks; None for a tensor stored whole
    under ``name``."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.recipe.shape)

    @property
    def dtype(self) -> str:
        return self.recipe.dtype

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)

    @property
    def is_copy(self) -> bool:
        """True when the destination is a source tensor copied unchanged."""
        return isinstance(self.recipe, Read) and self.recipe.is_whole


@dataclass
class Plan:
    """Everything a conversion will write, in order, plus what it was built from."""

    family: str
    src_layout: str
    dst_layout: str
    tensors: list[TensorPlan]
    moe_layers: dict[int, int] = field(default_factory=dict)
    """MoE layer index -> number of routed experts the plan writes."""
    expert_tensors: set[str] = field(default_factory=set)
    """Names of the destination tensors that hold routed-expert weights."""

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors), default=0)

    def refuse_chunks(self, format: str) -> None:
        """Refuse, for an output ``format`` that stores whole tensors, a plan whose layout
        stores a tensor in chunks (``megatron``'s, which only its own format holds)."""
        chunked = next((t for t in self.tensors if t.chunk is not None), None)
        if chunked is not None:
            raise MoekitError(f"the {self.dst_layout} layout stores {chunked.chunk.key} in "
                              f"chunks, which --format {format} cannot hold: write it with "
                              "--format megatron")

    def summary(self) -> str:
        """A short human summary of the plan (what ``--dry-run`` prints first)."""
        built = [t for t in self.tensors if not t.is_copy]
        lines = [
            f"family {self.family}: {self.src_layout} -> {self.dst_layout}",
            f"{len(self.moe_layers)} MoE layers, {len(self.tensors)} tensors "
            f"({len(built)} built from expert tensors, {len(self.tensors) - len(built)} copied)",
            f"{format_size(self.total_bytes)} in total, largest tensor "
            f"{format_size(self.largest_tensor_bytes)}",
        ]
        return "\n".join(lines)

