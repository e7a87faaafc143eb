"""Building and validating conversion plans from headers alone.

``analyse`` understands a source (family, layout, MoE blocks as canonical pieces) and
validates all of it, raising one PlanError that lists every problem grouped by layer.
``build_plan`` then emits the destination layout's tensors from those pieces.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint
from .detect import detect_family, detect_layout
from .errors import MoekitError, PlanError, compress_ranges, plural
from .gc_pauses import without_gc_pauses
from .layouts import FAMILIES, LAYOUTS, ExpertBlock, Family, Layout, family_named, layout_named
from .layouts.base import ParsedExperts, TensorMeta
from .layouts.families import FP8_SCALE_KEY, MX_BLOCKS, MX_SCALES, SCALE
from .output import check_destination
from .plan import Dequantize, DequantizeMXFP4, Expr, Plan, Read, TensorPlan
from .sizes import parse_size


@dataclass
class Analysis:
    """A source understood: its family, layout, MoE blocks and pass-through tensors."""

    label: str
    family: Family
    layout: Layout
    parsed: ParsedExperts
    n_experts: int
    tensors: Mapping[str, TensorMeta]

    @property
    def blocks(self) -> dict[int, ExpertBlock]:
        return self.parsed.blocks

    @property
    def is_moe(self) -> bool:
        return bool(self.blocks)


def understand(tensors: Mapping[str, TensorMeta], config: dict | None,
               metadata: Mapping[str, str], label: str, from_: str | None = None,
               family: str | None = None, n_experts: int | None = None) -> Analysis:
    """Detect family and layout and parse the experts, without judging them.

    ``from_``, ``family`` and ``n_experts`` override what detection and config.json say.
    """
    fam = _family(family) if family else detect_family(tensors, config, metadata)
    layout = layout_named(from_) if from_ else detect_layout(tensors, fam, metadata, label)
    parsed = layout.parse(dict(tensors), fam)
    return Analysis(label, fam, layout, parsed, n_experts or _expert_count(parsed, fam, config),
                    tensors)


def validate(analysis: Analysis, required: range | None = None,
             where: Callable[[str], str | None] = lambda key: None) -> None:
    """Raise one PlanError listing every problem of the experts, grouped by layer.

    ``required`` limits the completeness checks to the experts the caller will read (an
    expert-parallel rank needs only its own); ``where(key)`` names the file a key is
    stored in, for messages.
    """
    n = analysis.n_experts
    problems = _problems(analysis.parsed, analysis.family, analysis.layout, n, where,
                         range(n) if required is None else required)
    if problems:
        raise PlanError(f"{analysis.label} ({analysis.family.name}, layout "
                        f"{analysis.layout.name}) is not a valid checkpoint:", problems)


def analyse(tensors: Mapping[str, TensorMeta], config: dict | None,
            metadata: Mapping[str, str], label: str, from_: str | None = None,
            where: Callable[[str], str | None] = lambda key: None,
            family: str | None = None, n_experts: int | None = None) -> Analysis:
    """``understand`` then ``validate`` every expert."""
    analysis = understand(tensors, config, metadata, label, from_, family, n_experts)
    validate(analysis, where=where)
    return analysis


@without_gc_pauses
def analyse_checkpoint(path: str | Path, from_: str | None = None) -> tuple[Checkpoint, Analysis]:
    """Read a checkpoint's headers, detect its family and layout and validate its experts."""
    checkpoint = Checkpoint.open(path)
    analysis = analyse(checkpoint.tensors, checkpoint.config, checkpoint.metadata,
                       str(checkpoint.path), from_=from_, where=checkpoint.file_of)
    return checkpoint, analysis


def plan_conversion(src: str | Path, dst: str | Path, to: str, from_: str | None = None,
                    max_shard_size: int | str = "5GB", overwrite: bool = False,
                    dequantize: bool = False) -> tuple[Checkpoint, Plan]:
    """Everything a conversion checks before it writes, from headers alone: the source's
    experts, the plan into layout ``to``, the shard size and the destination. Imports no
    torch, so that a dry run answers at once."""
    checkpoint, analysis = analyse_checkpoint(src, from_)
    plan = build_plan(analysis, layout_named(to), dequantize=dequantize)
    parse_size(max_shard_size)
    check_destination(Path(dst), checkpoint.path, overwrite, checkpoint.source_files())
    return checkpoint, plan


@without_gc_pauses
def build_plan(analysis: Analysis, dst: Layout, experts: range | None = None,
               offset: int = 0, dequantize: bool = False) -> Plan:
    """The plan that writes ``analysis``'s checkpoint in layout ``dst``.

    ``experts`` keeps only those experts of every MoE block, renumbered from ``offset``
    (an expert-parallel rank loads ``experts=its range``, and saves its local experts
    with ``offset=the range's start``). ``dequantize`` writes every FP8 weight that has
    block scales (experts and others) as bf16, without its scales.
    """
    if not analysis.is_moe and dst.name != "hf":
        raise MoekitError(
            f"the source holds no expert tensors (a dense model, family "
            f"{analysis.family.name}): the {dst.name} layout applies only to MoE checkpoints; "
            "use `moekit upcycle` to turn a dense model into an MoE")
    blocks = {layer: _dequantized(block) if dequantize else block
              for layer, block in analysis.blocks.items()}
    _check_held(blocks, analysis.family, dst)
    src = analysis.layout
    chosen = range(analysis.n_experts) if experts is None else experts
    by_layer: dict[int, list[TensorPlan]] = {
        layer: dst.emit(select_experts(block, chosen, offset), offset + len(chosen),
                        analysis.family)
        for layer, block in sorted(blocks.items())}
    expert_names = {t.name for emitted in by_layer.values() for t in emitted}
    layer_of_key = {key: layer for layer, block in analysis.blocks.items()
                    for key in _source_keys(block)}
    tensors: list[TensorPlan] = []
    for key in analysis.tensors:
        if key in layer_of_key:
            tensors.extend(by_layer.pop(layer_of_key[key], []))
        elif key not in analysis.parsed.claimed:
            recipe = _passed_through(key, analysis.tensors, dequantize)
            if recipe is not None:
                name = dst.from_hf_key(src.to_hf_key(key, analysis.family), analysis.family)
                tensors.append(TensorPlan(name, recipe))
    _check_unique(tensors)
    return Plan(analysis.family.name, src.name, dst.name, tensors,
                {layer: len(chosen) for layer in sorted(analysis.blocks)}, expert_names)


def _check_held(blocks: Mapping[int, ExpertBlock], family: Family, dst: Layout) -> None:
    """Refuse a destination layout with no place for some of the experts' pieces (expert
    biases in nemo), rather than drop them."""
    present = {piece for block in blocks.values() for piece, _ in block.pieces}
    lost = sorted(p for p in present if not dst.holds(p, family))
    if lost:
        can = [name for name, layout in LAYOUTS.items()
               if all(layout.holds(p, family) for p in lost)]
        quantized = any(p.endswith((SCALE, MX_BLOCKS, MX_SCALES)) for p in lost)
        raise MoekitError(f"the {dst.name} layout cannot hold the {family.name} experts' "
                          f"{', '.join(lost)}; moekit refuses to drop them. Layouts that hold "
                          f"them: {', '.join(can)}"
                          + ("; or pass --dequantize to write bf16 weights" if quantized else ""))


def _dequantized(block: ExpertBlock) -> ExpertBlock:
    """The block with every FP8 weight (and its scale) and every MXFP4 weight (its blocks
    and scales) replaced by the bf16 weight."""
    pieces = dict(block.pieces)
    for (piece, e), part in block.pieces.items():
        if piece.endswith(SCALE):
            weight = piece[:-len(SCALE)]
            pieces[(weight, e)] = Dequantize(pieces[(weight, e)], part)
            del pieces[(piece, e)]
        elif piece.endswith(MX_BLOCKS):
            weight = piece[:-len(MX_BLOCKS)]
            pieces[(weight, e)] = DequantizeMXFP4(part, pieces.pop((weight + MX_SCALES, e)))
            del pieces[(piece, e)]
    names = {k: v for k, v in block.names.items() if k in pieces}
    return ExpertBlock(block.layer, block.block, pieces, names)


def _passed_through(key: str, tensors: Mapping[str, TensorMeta], dequantize: bool
                    ) -> Expr | None:
    """The recipe of a non-expert tensor: itself, or with ``dequantize`` an FP8 weight
    dequantised with its ``*_scale_inv`` (and None for that scale, which is dropped)."""
    meta = tensors[key]
    read = Read.whole(key, meta)
    if not dequantize:
        return read
    if key.endswith(FP8_SCALE_KEY) and key[:-len(FP8_SCALE_KEY)] in tensors:
        return None
    scale = tensors.get(key + FP8_SCALE_KEY)
    if scale is None:
        return read
    return Dequantize(read, Read.whole(key + FP8_SCALE_KEY, scale))


def select_experts(block: ExpertBlock, experts: range, offset: int = 0) -> ExpertBlock:
    """The block with only ``experts``, renumbered so that ``experts[0]`` becomes ``offset``
    (the block itself when that changes nothing, as in a whole-checkpoint conversion)."""
    if experts.start == offset and all(e in experts for _, e in block.pieces):
        return block

    def keep(item: tuple[tuple[str, int], object]) -> bool:
        return item[0][1] in experts

    def moved(key: tuple[str, int]) -> tuple[str, int]:
        return key[0], key[1] - experts.start + offset

    return ExpertBlock(block.layer, block.block,
                       {moved(k): v for k, v in filter(keep, block.pieces.items())},
                       {moved(k): v for k, v in filter(keep, block.names.items())})


def _source_keys(block: ExpertBlock) -> set[str]:
    return {name.split("[", 1)[0] for name in block.names.values()}


def _check_unique(tensors: list[TensorPlan]) -> None:
    seen = Counter(t.name for t in tensors)
    clashes = [name for name, n in seen.items() if n > 1]
    if clashes:
        raise MoekitError(f"the conversion would write {len(clashes)} tensor name(s) twice, "
                          f"e.g. {clashes[0]}: the source holds both an expert tensor and a "
                          "tensor already named like its converted form")


def _family(name: str) -> Family:
    found = family_named(name)
    if found is None:
        known = ", ".join(f.name for f in FAMILIES)
        raise MoekitError(f"unknown model family {name!r}; known families: {known}")
    return found


def _expert_count(parsed: ParsedExperts, family: Family, config: dict | None) -> int:
    declared = (config or {}).get(family.expert_count_key)
    if isinstance(declared, int) and declared > 0:
        return declared
    return max((max(b.experts) + 1 for b in parsed.blocks.values() if b.experts), default=0)


def _problems(parsed: ParsedExperts, family: Family, layout: Layout, n_experts: int,
              where: Callable[[str], str | None], required: range) -> list[str]:
    by_layer: dict[int, list[str]] = defaultdict(list)
    for layer, problem in parsed.problems:
        by_layer[layer].append(problem)
    for layer, block in parsed.blocks.items():
        by_layer[layer].extend(_block_problems(block, family, layout, n_experts, where, required))
    return [f"layer {layer}: {p}" for layer in sorted(by_layer) for p in by_layer[layer]]


def _block_problems(block: ExpertBlock, family: Family, layout: Layout, n_experts: int,
                    where: Callable[[str], str | None], required: range) -> list[str]:
    def name(piece: str) -> str:
        return family.piece_key(piece).removesuffix(".weight") if layout.name == "hf" else piece

    problems = []
    missing: dict[tuple[str, ...], list[int]] = defaultdict(list)
    needed = family.required_pieces({p for p, _ in block.pieces})
    for e in required:
        lacking = tuple(name(p) for p in needed if (p, e) not in block.pieces)
        if lacking:
            missing[lacking].append(e)
    stored = _stored_in(block, where) if missing else ""
    for projs, absent in missing.items():
        problems.append(f"{plural(len(absent), 'expert')} {compress_ranges(absent)} "
                        f"{'lacks' if len(absent) == 1 else 'lack'} {', '.join(projs)}{stored}")
    extra = [e for e in block.experts if e >= n_experts]
    if extra:
        problems.append(f"{plural(len(extra), 'expert')} {compress_ranges(extra)} beyond the "
                        f"{n_experts} experts config.json declares ({family.expert_count_key})")
    problems.extend(_shape_problems(block, family, name, where, required))
    return problems


def _stored_in(block: ExpertBlock, where: Callable[[str], str | None]) -> str:
    """The ``" (layer stored in FILES)"`` of a message, or "" when ``where`` knows none."""
    files = sorted({f for f in (where(n.split("[", 1)[0]) for n in block.names.values()) if f})
    return f" (layer stored in {', '.join(files)})" if files else ""


def _shape_problems(block: ExpertBlock, family: Family, name: Callable[[str], str],
                    where: Callable[[str], str | None], required: range) -> list[str]:
    """Required experts whose shape or dtype differs from the other experts' (the majority)."""
    problems = []
    expected: dict[str, tuple] = {}
    by_piece: dict[str, dict[int, tuple]] = defaultdict(dict)
    for (piece, e), x in block.pieces.items():
        by_piece[piece][e] = (tuple(x.shape), x.dtype)
    for proj in family.all_pieces:
        found = by_piece.get(proj)
        if not found:
            continue
        common, _ = Counter(found.values()).most_common(1)[0]
        expected[proj] = common
        odd = defaultdict(list)
        for e, got in found.items():
            if got != common and e in required:
                odd[got].append(e)
        for (shape, dtype), experts in odd.items():
            key = block.names[(proj, experts[0])].split("[", 1)[0]
            file = where(key)
            problems.append(
                f"{plural(len(experts), 'expert')} {compress_ranges(experts)} {name(proj)} "
                f"{'is' if len(experts) == 1 else 'are'} {list(shape)} {dtype}, the other "
                f"experts {list(common[0])} {common[1]}" + (f" (in {file})" if file else ""))
    gate, up, down = (expected.get(p) for p in ("gate", "up", "down"))
    if gate and up and gate[0] != up[0]:
        problems.append(f"{name('gate')} {list(gate[0])} and {name('up')} {list(up[0])} differ in shape")
    if up and down and tuple(reversed(up[0])) != down[0]:
        problems.append(f"{name('down')} is {list(down[0])}, expected {list(reversed(up[0]))} "
                        f"(the transpose of {name('up')})")
    return problems
