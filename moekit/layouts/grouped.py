"""Grouped layouts: all experts of a layer in one tensor per projection group.

For a non-gated family (experts with ``up`` and ``down`` only, e.g. ReLU² in Nemotron-H)
the gate+up tensor holds ``up`` alone: nemo ``gate_and_up_projs`` [E,H,I], vllm
``w13_weight`` [E,I,H], transformers ``up_proj`` [E,I,H] (Nemotron-H's own name).

Each grouped layout is a list of ``GroupedTensor`` entries, pure data: which canonical
projections the tensor holds, whether it stores them ``[E, out, in]`` (as ``nn.Linear``)
or transposed ``[E, in, out]``, and whether several projections are concatenated one
after the other or interleaved element by element along the output dimension.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from itertools import product

from ..errors import MoekitError

from ..plan import Concat, Constant, Expr, Read, Reshape, Stack, TensorPlan, Transpose
from .base import NUMBER, ExpertBlock, Layout, ParsedExperts, TensorMeta, is_canonical
from .families import (FP8_SCALE_KEY, MAX_EXPERTS, MX_BLOCKS, MX_SCALES, QUANTIZED_KEYS,
                       SCALE, Family)

MXFP4_DTYPE = "U8"
"""MXFP4 blocks (two FP4 codes a byte) and scales (E8M0 exponents) are bytes."""
MXFP4_PAIRS = 16
"""Bytes per MXFP4 block of 32 inputs: blocks are [out, in/32, 16]."""


@dataclass(frozen=True)
class GroupedTensor:
    """One grouped tensor of a layout, e.g. NeMo's ``gate_and_up_projs`` [E, H, 2I]."""

    name: str
    projections: tuple[str, ...]
    transposed: bool
    """True: ``[E, in, out]``; False: ``[E, out, in]`` like a stack of ``nn.Linear`` weights."""
    interleaved: bool = False
    """True: projection k fills output positions ``k::n``; False: concatenated in order."""
    ungated_name: str | None = None
    """The name this tensor takes for a family without a gate projection (ReLU² experts),
    where it holds ``up`` alone; None keeps ``name``."""
    piece_dims: int = 2
    """Dimensions of one expert's piece: 2 for weights [out, in], 1 for biases [out], 3 for
    MXFP4 blocks [out, in/32, 16] (MXFP4 scales are [out, in/32])."""
    orientable: bool = True
    """False for pieces stored [E, out, ...] whatever the layout's orientation (biases,
    MXFP4 blocks and scales, packed along the input dimension)."""
    flat_blocks: bool = False
    """True for MXFP4 blocks stored [E, out, in/2] (vLLM): each expert's canonical blocks
    [out, in/32, 16] with their last two dimensions merged, the same bytes."""
    dtype: str | None = None
    """The only dtype a tensor read as this entry has (vLLM names its MXFP4 blocks
    ``w13_weight`` like the weights, in U8); None: any."""
    aliases: tuple[str, ...] = ()
    """Other names read as this tensor (a consumer's names of earlier releases)."""
    joined_scale_grid: bool = False
    """True for FP8 block scales laid as one grid over the joined output rows (transformers'
    fused FP8 experts): the projections' own grids stacked only when each projection's
    rows are a whole number of blocks."""

    @property
    def vector(self) -> bool:
        return self.piece_dims == 1

    @property
    def turned(self) -> bool:
        """True when stored ``[E, in, out]``."""
        return self.transposed and self.orientable

    @property
    def out_dim(self) -> int:
        """The dimension of the grouped tensor that runs over the output features."""
        return 2 if self.turned else 1


class GroupedLayout(Layout):
    """A layout that keeps all experts of a layer in a few grouped tensors."""

    grouped = True
    by_family: dict[str, tuple[GroupedTensor, ...]]
    """Family name -> the grouped tensors this layout holds for that family in place of
    ``tensors``, where its consumer's model of the family has a set of its own
    (torchtitan's GPT-OSS: ``mlp1_weight_EGD`` and ``mlp2_weight_EDF`` with biases)."""

    def __init__(self, name: str, description: str, tensors: tuple[GroupedTensor, ...],
                 quantized_note: str = "",
                 by_family: Mapping[str, tuple[GroupedTensor, ...]] | None = None) -> None:
        self.name = name
        self.description = description
        self.tensors = tensors
        self.quantized_note = quantized_note
        self.by_family = dict(by_family or {})

    def specs(self, family: Family) -> tuple[GroupedTensor, ...]:
        """This layout's grouped tensors for ``family`` (its own set in ``by_family``, else
        ``tensors``): holding only the projections the family has (a non-gated family has
        no gate), in the family's orientation where it differs (Llama 4's own fused
        experts are ``[E, in, out]``)."""
        transposed = family.transposed.get(self.name)
        interleaved = family.interleaved.get(self.name)
        specs = []
        for spec in self.by_family.get(family.name, self.tensors):
            held = tuple(p for p in spec.projections if p in family.all_pieces)
            if not held:
                continue
            if held != spec.projections:
                spec = replace(spec, projections=held, name=spec.ungated_name or spec.name,
                               aliases=())
            if transposed is not None:
                spec = replace(spec, transposed=transposed)
            if interleaved is not None:
                spec = replace(spec, interleaved=interleaved)
            specs.append(spec)
        return tuple(specs)

    def holds(self, piece: str, family: Family) -> bool:
        return any(piece in spec.projections for spec in self.specs(family))

    def places(self, family: Family) -> tuple[str, ...]:
        """Where each group of a layer's experts lies inside the block, in HF naming before
        the family's renames: ``experts.`` for a family of one group; for one of several
        (``Family.expert_groups``) each group's module's (``text_moe.experts.``), none
        where this layout has no module for them."""
        if not family.expert_groups:
            return ("experts.",)
        if any(self.name not in group.modules for group in family.expert_groups):
            return ()
        return tuple(f"{group.modules[self.name]}.experts." for group in family.expert_groups)

    def parse(self, tensors: dict[str, TensorMeta], family: Family) -> ParsedExperts:
        """The experts of each group (``places``), numbered one group after another as the
        HF files number them: group k's expert e is ``k * its rows + e``."""
        parsed = ParsedExperts()
        by_name: dict[str, list[GroupedTensor]] = {}
        for spec in self.specs(family):
            for name in (spec.name, *spec.aliases):
                by_name.setdefault(name, []).append(spec)
        groups = []
        for place in self.places(family):
            region = self._region(family, place)
            renamed = self._renamed_keys(family, by_name, place)
            groups.append((region, renamed, self._flipped_layers(tensors, family, region,
                                                                 renamed)))
        rows: dict[int, dict[tuple[int, GroupedTensor], int]] = {}
        keys: dict[tuple[int, int, GroupedTensor], str] = {}
        for key, meta in tensors.items():
            group, inside, name = self._grouped(key, groups)
            if not inside or name in family.in_experts:
                continue
            numbers = parsed.numbers(key, inside)
            if numbers is None:
                continue
            layer = numbers["layer"]
            spec = self._entry(by_name.get(name, []), meta.dtype)
            if spec is None:
                parsed.problems.append((layer, self._unknown(key)))
                continue
            earlier = keys.setdefault((layer, group, spec), key)
            if earlier != key:
                parsed.problems.append((layer, self._twice(spec, earlier, key)))
                continue
            stored = (replace(spec, transposed=not spec.transposed)
                      if layer in groups[group][2] and spec.orientable else spec)
            problem = self._add_pieces(parsed.block(layer, family), key, meta, stored, group)
            if problem:
                parsed.problems.append((layer, problem))
                parsed.unreadable.setdefault(layer, set()).update(spec.projections)
            else:
                rows.setdefault(layer, {})[(group, spec)] = tuple(meta.shape)[0]
        self._check_agreement(parsed, family, rows)
        return parsed

    def expert_region(self, family: Family) -> re.Pattern[str]:
        """Keys inside an experts module of ``family``: of any of its groups (``places``)."""
        places = self.places(family)
        if len(places) < 2:
            return super().expert_region(family)
        head, _ = self.from_hf_key(f"{family.block}.", family).split("{layer}")
        tails = [self.from_hf_key(f"{family.block}.{place}", family).split("{layer}")[1]
                 for place in places]
        return re.compile(f"^{re.escape(head)}(?P<layer>{NUMBER})"
                          f"(?:{'|'.join(map(re.escape, tails))})")

    def _region(self, family: Family, place: str) -> re.Pattern[str]:
        """Keys that lie inside the experts module at ``place`` of ``family``'s blocks (in
        this layout's naming)."""
        region = re.escape(self.from_hf_key(f"{family.block}.{place}", family))
        return re.compile("^" + region.replace(r"\{layer\}", f"(?P<layer>{NUMBER})"))

    def _flipped_layers(self, tensors: Mapping[str, TensorMeta], family: Family,
                        region: re.Pattern[str], renamed: list[tuple[re.Pattern[str], str]]
                        ) -> set[int]:
        """The layers whose weights are stored in the other orientation than this layout's,
        for a family read in either (``Family.either_orientation``): those whose gate+up
        [E, a, b] and down [E, c, d] fit only the other. ``[E, out, in]`` fits when b == c
        and a == 2d, ``[E, in, out]`` when a == d and b == 2c; both at once would need
        a == 0."""
        if self.name not in family.either_orientation:
            return set()
        weights = [s for s in self.specs(family) if s.orientable and s.piece_dims == 2]
        joined = next((s for s in weights if len(s.projections) == 2), None)
        down = next((s for s in weights if s.projections == ("down",)), None)
        if joined is None or down is None:
            return set()
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, meta in tensors.items():
            inside, name = self._located(key, region, renamed)
            if inside and name in (joined.name, down.name) and len(meta.shape) == 3:
                shapes.setdefault(inside["layer"], {})[name] = tuple(meta.shape[1:])
        flipped = set()
        for layer, found in shapes.items():
            if len(found) < 2 or not is_canonical(layer):
                continue
            (a, b), (c, d) = found[joined.name], found[down.name]
            fits = {False: b == c and a == 2 * d, True: a == d and b == 2 * c}
            if fits[not joined.turned] and not fits[joined.turned]:
                flipped.add(int(layer))
        return flipped

    @classmethod
    def _grouped(cls, key: str, groups: list[tuple[re.Pattern[str], list, set[int]]]
                 ) -> tuple[int, re.Match[str] | None, str]:
        """``_located`` in the first of ``groups`` (region, renamed keys, flipped layers)
        that places ``key``, and that group's index."""
        for group, (region, renamed, _) in enumerate(groups):
            inside, name = cls._located(key, region, renamed)
            if inside:
                return group, inside, name
        return 0, None, ""

    @staticmethod
    def _located(key: str, region: re.Pattern[str], renamed: list[tuple[re.Pattern[str], str]]
                 ) -> tuple[re.Match[str] | None, str]:
        """The match that places ``key`` in a layer and the grouped tensor name it holds:
        inside the experts module (``region``), or at a renamed place."""
        for pattern, name in renamed:
            match = pattern.match(key)
            if match:
                return match, name
        inside = region.match(key)
        return (inside, key[inside.end():]) if inside else (None, "")

    def _renamed_keys(self, family: Family, names: Iterable[str], place: str
                      ) -> list[tuple[re.Pattern[str], str]]:
        """(pattern, name) of the tensors that ``family``'s renames name otherwise than
        ``{block}.{place}{name}`` (GraniteMoE's on-disk ``block_sparse_moe.input_linear.weight``,
        Aria's ``experts.fc1.weight``): each pattern captures the layer; ``name`` is the
        tensor's name in this layout."""
        inside = f"{family.block}.{place}"
        region = self.from_hf_key(inside, family)
        patterns = []
        for name in names:
            key = self.from_hf_key(inside + name, family)
            if key != region + name:
                pattern = re.escape(key).replace(r"\{layer\}", f"(?P<layer>{NUMBER})")
                patterns.append((re.compile(f"^{pattern}\\Z"), name))
        return patterns

    def joins_scale_blocks(self, family: Family) -> bool:
        """True when this layout lays the FP8 scales of several projections as one grid
        over their joined rows (see ``GroupedTensor.joined_scale_grid``)."""
        return any(spec.joined_scale_grid and len(spec.projections) > 1
                   for spec in self.specs(family))

    @staticmethod
    def _entry(candidates: list[GroupedTensor], dtype: str) -> GroupedTensor | None:
        """The entry a tensor of this name and dtype is read as."""
        if not candidates:
            return None
        return next((c for c in candidates if c.dtype == dtype), None) or next(
            (c for c in candidates if c.dtype is None), None)

    def _twice(self, spec: GroupedTensor, *keys: str) -> str:
        """The problem of two keys read as the same tensor of one layer (vLLM's name and
        its older alias): which holds the weights is ambiguous."""
        first, second = sorted(keys)
        return (f"{first} and {second} both name the layer's {spec.name} in the {self.name} "
                "layout (one is an older name of the other): keep one of them")

    def _unknown(self, key: str) -> str:
        """The problem of a key inside an experts module that names no tensor of this
        layout."""
        if key.endswith(FP8_SCALE_KEY) and self.quantized_note:
            return (f"{key} holds FP8 block scales, which the {self.name} layout does not "
                    f"have: {self.quantized_note}. moekit reads no such file; convert the "
                    f"FP8 checkpoint it was made from again, with --dequantize for "
                    f"{self.name}, or into a layout that holds FP8 scales")
        return (f"{key} is not a grouped expert tensor of the {self.name} layout (is the "
                "source layout right?)")

    def emit(self, block: ExpertBlock, n_experts: int, family: Family) -> list[TensorPlan]:
        """Each group's grouped tensors (``places``), group k holding experts ``k * n`` to
        ``(k + 1) * n - 1`` of the ``n_experts``."""
        places = self.places(family)
        if not places:
            raise MoekitError(self.unheld(family))
        out = []
        square = self._square_gate_up(block, family)
        size = n_experts // len(places)
        for group, place in enumerate(places):
            experts = range(group * size, (group + 1) * size)
            for spec in self.specs(family):
                if square and spec.turned:
                    spec = replace(spec, transposed=False)
                projections = [p for p in spec.projections if (p, experts.start) in block.pieces]
                if not projections:
                    continue
                combine = self._combiner(spec)
                per_expert = [combine([block.pieces[(p, e)] for p in projections])
                              for e in experts]
                name = self.from_hf_key(f"{block.block}.{place}{spec.name}", family)
                out.append(TensorPlan(name, Stack(tuple(per_expert))))
        return out

    def unheld(self, family: Family) -> str:
        """Why this layout holds no experts of ``family``, whose layers hold several groups
        of them, where it has no module for each (``places``)."""
        groups = ", ".join(group.name for group in family.expert_groups)
        why = family.groups_unheld.get(self.name, "it has no module for each group")
        return (f"the {self.name} layout cannot hold the {family.name} experts, which each "
                f"MoE layer holds in {len(family.expert_groups)} groups ({groups}), each with "
                f"its own router: {why}")

    def _square_gate_up(self, block: ExpertBlock, family: Family) -> bool:
        """True when ``family`` is read in either orientation here and its gate+up is square
        (2I == H): transformers 5.24 would read an ``[E, in, out]`` one as its own ``[E, out,
        in]`` (its Transpose(check_dims=True) sees the parameter's shape), so the weights
        are written ``[E, out, in]``, which moekit reads back by the down tensor's shape."""
        if self.name not in family.either_orientation:
            return False
        gate = next((x for (p, _), x in block.pieces.items() if p == "gate"), None)
        return gate is not None and len(gate.shape) == 2 and 2 * gate.shape[0] == gate.shape[1]

    def emit_none(self, block: ExpertBlock, family: Family) -> list[TensorPlan]:
        """Every grouped tensor with zero rows (``[0, ...]``, the other dimensions those of
        ``block``'s experts): a rank that owns no expert still holds each grouped tensor,
        as its empty local shard of a DTensor ``Shard(0)``."""
        first = min((e for _, e in block.pieces), default=None)
        if first is None:
            return []
        one = ExpertBlock(block.layer, block.block,
                          {(p, 0): x for (p, e), x in block.pieces.items() if e == first})
        return [TensorPlan(t.name, Constant((0, *t.shape[1:]), t.dtype))
                for t in self.emit(one, 1, family)]

    @staticmethod
    def _flattened(piece: Expr) -> Expr:
        """An expert's MXFP4 blocks [out, in/32, 16] as a ``flat_blocks`` tensor stores them."""
        out, groups, pairs = piece.shape
        return Reshape(piece, (out, groups * pairs))

    @classmethod
    def _combiner(cls, spec: GroupedTensor) -> Callable[[list[Expr]], Expr]:
        """What makes one expert's part of the grouped tensor ``spec`` from its pieces (in
        the order of ``spec.projections``): each oriented, joined, flattened as ``spec``
        stores it. Asked once a tensor, not once an expert."""
        turned, dim, interleave = spec.turned, spec.out_dim - 1, spec.interleaved

        def combine(pieces: list[Expr]) -> Expr:
            oriented = [Transpose(p) for p in pieces] if turned else pieces
            return oriented[0] if len(oriented) == 1 else Concat(tuple(oriented), dim, interleave)

        if not spec.flat_blocks:
            return combine
        return lambda pieces: cls._flattened(combine(pieces))

    @staticmethod
    def _add_pieces(block: ExpertBlock, key: str, meta: TensorMeta,
                    spec: GroupedTensor, group: int = 0) -> str | None:
        """Read ``key`` as ``spec`` into ``block``, its rows the experts of the ``group``-th
        expert group (numbered after the earlier groups', as many each); or the problem
        that keeps it from being read."""
        shape = tuple(meta.shape)
        dims = spec.piece_dims + 1
        if len(shape) != dims:
            return f"{key} has shape {list(shape)}; this grouped expert tensor has {dims} dimensions"
        if shape[0] > MAX_EXPERTS:
            return (f"{key} has shape {list(shape)}: {shape[0]} experts, more than the "
                    f"{MAX_EXPERTS} moekit plans for in a layer")
        if 0 in shape[1:]:
            return f"{key} has shape {list(shape)}: its experts hold no elements"
        n = len(spec.projections)
        out_size = shape[spec.out_dim]
        if out_size % n:
            return (f"{key} has {out_size} output features, not divisible among "
                    f"{'/'.join(spec.projections)}")
        if spec.flat_blocks and shape[2] % MXFP4_PAIRS:
            return (f"{key} has shape {list(shape)}; MXFP4 blocks held [E, out, in/2] have "
                    f"a multiple of {MXFP4_PAIRS} bytes per row")
        size, first = out_size // n, group * shape[0]
        turned, every = spec.turned, slice(None)
        read_shape = (shape[1], size) if turned else (size, *shape[2:])
        for k, proj in enumerate(spec.projections):
            part = slice(k, None, n) if spec.interleaved else slice(k * size, (k + 1) * size)
            for e in range(shape[0]):
                if not turned:
                    read: Expr = Read(key, (e, part), read_shape, meta.dtype)
                else:
                    read = Transpose(Read(key, (e, every, part), read_shape, meta.dtype))
                if spec.flat_blocks:
                    read = Reshape(read, (size, shape[2] // MXFP4_PAIRS, MXFP4_PAIRS))
                block.pieces[(proj, first + e)] = read
                block.names[(proj, first + e)] = key
        return None

    def _check_agreement(self, parsed: ParsedExperts, family: Family,
                         rows: dict[int, dict[tuple[int, GroupedTensor], int]]) -> None:
        """Every grouped tensor of each group of a block must be present (FP8 scales only
        in an FP8 checkpoint; MXFP4 blocks and scales instead of the weights in an MXFP4
        one) and hold the same number of experts (``rows``: the experts of each
        well-formed tensor by group, by layer; zero for an expert-parallel rank that owns
        none). A tensor present but malformed is reported as such, not as missing."""
        specs = self.specs(family)
        for layer, block in parsed.blocks.items():
            found = rows.get(layer, {})
            needed = set(family.required_pieces({p for _, spec in found
                                                 for p in spec.projections}))
            counts = {}
            for (group, place), spec in product(enumerate(self.places(family)), specs):
                if spec.projections[0] not in needed:
                    continue
                names = [self.from_hf_key(f"{block.block}.{place}{name}", family)
                         for name in (spec.name, *spec.aliases)]
                if (group, spec) in found:
                    counts[place.removesuffix("experts.") + spec.name] = found[(group, spec)]
                elif not parsed.claimed.intersection(names):
                    parsed.problems.append((layer, f"{names[0]} is missing"))
            if len(set(counts.values())) > 1:
                shown = ", ".join(f"{k} holds {v}" for k, v in counts.items())
                parsed.problems.append((layer, f"grouped tensors disagree on the expert count: {shown}"))


def with_scales(tensors: tuple[GroupedTensor, ...]) -> tuple[GroupedTensor, ...]:
    """A layout's tensors plus, for each weight tensor, its FP8 block scales stacked,
    concatenated and oriented the same way (``{name}_scale_inv``)."""
    scales = tuple(replace(t, name=t.name + FP8_SCALE_KEY,
                           ungated_name=t.ungated_name and t.ungated_name + FP8_SCALE_KEY,
                           aliases=tuple(a + FP8_SCALE_KEY for a in t.aliases),
                           projections=tuple(p + SCALE for p in t.projections))
                   for t in tensors if t.piece_dims == 2)
    return tensors + scales


def _mxfp4(weights: tuple[GroupedTensor, ...]) -> tuple[GroupedTensor, ...]:
    """GPT-OSS's MXFP4 tensors beside each weight tensor: ``{name}_blocks`` [E, out, in/32,
    16] uint8 (two FP4 values a byte) and ``{name}_scales`` [E, out, in/32] uint8 (E8M0
    exponents), both out-major whatever the weights' orientation."""
    return tuple(replace(t, name=t.name + QUANTIZED_KEYS[suffix], ungated_name=None,
                         orientable=False, piece_dims=dims,
                         projections=tuple(p + suffix for p in t.projections))
                 for t in weights for suffix, dims in ((MX_BLOCKS, 3), (MX_SCALES, 2)))


def _vllm_mxfp4(weights: tuple[GroupedTensor, ...]) -> tuple[GroupedTensor, ...]:
    """MXFP4 experts as vLLM's Mxfp4MoEMethod creates them (``create_weights``, vLLM 0.33):
    the blocks under the weight's own name, U8 [E, out, in/2], and the scales as
    ``{name}_scale`` U8 [E, out, in/32]; the same bytes as GPT-OSS's ``*_blocks`` and
    ``*_scales``."""
    return tuple(
        replace(t, ungated_name=None, orientable=False, piece_dims=2, dtype=MXFP4_DTYPE,
                flat_blocks=True, projections=tuple(p + MX_BLOCKS for p in t.projections))
        for t in weights) + tuple(
        replace(t, name=t.name + "_scale", ungated_name=None, orientable=False, piece_dims=2,
                aliases=tuple(a + "_scale" for a in t.aliases),
                projections=tuple(p + MX_SCALES for p in t.projections))
        for t in weights)


NEMO = GroupedLayout(
    "nemo", "NeMo AutoModel's own format (0.7), what its state-dict adapters' from_hf gives, "
    "for training in NeMo AutoModel: gate_and_up_projs [E,H,2I], down_projs [E,I,H] (biases "
    "gate_up_proj_bias [E,2I], down_proj_bias [E,H]); no FP8 scales (NeMo dequantizes on "
    "load)",
    (GroupedTensor("gate_and_up_projs", ("gate", "up"), transposed=True),
     GroupedTensor("down_projs", ("down",), transposed=True),
     GroupedTensor("gate_up_proj_bias", ("gate_bias", "up_bias"), False, piece_dims=1,
                   orientable=False),
     GroupedTensor("down_proj_bias", ("down_bias",), False, piece_dims=1, orientable=False)),
    quantized_note="NeMo AutoModel dequantizes FP8 and MXFP4 checkpoints when it loads them "
                   "and holds no scale tensors")

_TRANSFORMERS_WEIGHTS = (
    GroupedTensor("gate_up_proj", ("gate", "up"), transposed=False, ungated_name="up_proj"),
    GroupedTensor("down_proj", ("down",), transposed=False))
TRANSFORMERS = GroupedLayout(
    "transformers", "transformers v5 in memory (5.24): the names and shapes of "
    "model.state_dict(), which transformers and vLLM's loader also read from disk: "
    "gate_up_proj [E,2I,H], down_proj [E,H,I] (biases gate_up_proj_bias [E,2I], "
    "down_proj_bias [E,H])",
    tuple(replace(t, joined_scale_grid=t.name.endswith(FP8_SCALE_KEY)) for t in with_scales((
        *_TRANSFORMERS_WEIGHTS,
        GroupedTensor("gate_up_proj_bias", ("gate_bias", "up_bias"), False, piece_dims=1,
                      orientable=False),
        GroupedTensor("down_proj_bias", ("down_bias",), False, piece_dims=1, orientable=False),
    ))) + _mxfp4(_TRANSFORMERS_WEIGHTS))

VLLM_EXPERTS = "routed_experts."
"""Where vLLM 0.33's FusedMoE holds its expert parameters (``experts.routed_experts.w13_weight``);
earlier releases held them on the FusedMoE module itself (``experts.w13_weight``), names
still read."""
_VLLM_WEIGHTS = tuple(
    replace(t, name=VLLM_EXPERTS + t.name, aliases=(t.name,)) for t in (
        GroupedTensor("w13_weight", ("gate", "up"), transposed=False),
        GroupedTensor("w2_weight", ("down",), transposed=False)))
VLLM = GroupedLayout(
    "vllm", "vLLM's FusedMoE parameters (0.33), to copy into a running engine's parameters "
    "(RL weight sync), not for vLLM's loader, which reads hf or transformers from disk: "
    "experts.routed_experts.w13_weight [E,2I,H], w2_weight [E,H,I] (biases w13_bias [E,2I], "
    "w2_bias [E,H]; MXFP4 as vLLM holds it)",
    with_scales((
        *_VLLM_WEIGHTS,
        GroupedTensor(VLLM_EXPERTS + "w13_bias", ("gate_bias", "up_bias"), False, piece_dims=1,
                      orientable=False, aliases=("w13_bias",)),
        GroupedTensor(VLLM_EXPERTS + "w2_bias", ("down_bias",), False, piece_dims=1,
                      orientable=False, aliases=("w2_bias",)))) + _vllm_mxfp4(_VLLM_WEIGHTS))
