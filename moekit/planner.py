"""Building and validating conversion plans from headers alone.

``analyse`` understands a source (family, layout, MoE blocks as canonical pieces) and
validates all of it against itself and its config.json, raising one PlanError that lists
every problem grouped by layer. ``build_plan`` then emits the destination layout's tensors
from those pieces. No check iterates over a count a header or config declares: the work is
bounded by the tensors present.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from pathlib import Path

from .checkpoint import FAMILY_METADATA_KEY, LAYOUT_METADATA_KEY, Checkpoint
from .detect import detect_family, detect_layout, refuse_packed
from .errors import (NAME_A_CONFIG, MoekitError, PlanError, compress_ranges, compress_runs,
                     plural, printable)
from .gc_pauses import without_gc_pauses
from .layouts import (BY_KEYS, FAMILIES, HF, LAYOUTS, ExpertBlock, Family, Layout, family_named,
                      layout_named)
from .layouts.base import ParsedExperts, TensorMeta
from .layouts.grouped import MXFP4_DTYPE, MXFP4_PAIRS, GroupedLayout
from .layouts.families import (FP8_SCALE_KEY, GENERIC_FAMILIES, MAX_EXPERTS, MX_BLOCKS,
                               MX_SCALES, SCALE, GroupPart, family_of_model_type, rename,
                               renamed_shape)
from .model_config import DEFAULT_FP8_BLOCK, ConfigValues, MoeLayers, expert_count, fp8_block
from .plan import (Concat, Dequantize, DequantizeMXFP4, Expr, Plan, Read, Reshape, Stack,
                   TensorPlan, Transpose, composed, composed_plan, reads)

SAMPLE = 1024
"""Keys a naming disagreement is judged on (a checkpoint is named one way throughout)."""
SHOWN_LAYERS = 64
"""Missing MoE layers named in a message; the rest are counted."""
FOUND = "found"
"""``Analysis.count_source`` of a count read off the expert numbers present."""


@dataclass(frozen=True)
class Settings:
    """What a config says that the weights are checked against."""

    source: str
    """How messages name the config (a config.json path, or "the config given")."""
    declared: tuple[int, str] | None
    """(routed experts, the config key saying so), when the config says."""
    moe_layers: MoeLayers | None
    """The layers the config makes MoE layers, when the family's rule and config say."""
    fp8_block: tuple[int, int]
    router_extra: tuple[int, str] | None = None
    """(router rows after the routed experts', the config key saying so), for families
    whose router scores experts that hold no weights (``Family.router_extra_rows``)."""


@dataclass
class Analysis:
    """A source understood: its family, layout, MoE blocks and pass-through tensors."""

    label: str
    family: Family
    layout: Layout
    parsed: ParsedExperts
    n_experts: int
    tensors: Mapping[str, TensorMeta]
    count_source: str = FOUND
    """Where ``n_experts`` comes from, as messages say it (``FOUND``, "given
    (n_experts=8)", "/x/config.json declares (num_experts)")."""
    settings: Settings | None = None
    whole_model: bool = False
    """True for a checkpoint: every MoE layer its config names must be present (a state
    dict may be one pipeline stage's part of a model)."""
    family_source: str = "detected"
    layout_source: str = "detected"
    config: Mapping | None = None
    """The config.json (or config given), which a whole-model layout places tensors by."""
    made: Mapping[str, Expr] = field(default_factory=dict)
    """Source tensors that the checkpoint's files hold in another form, each the recipe
    that makes it from them (a Megatron-Core checkpoint's tensors under HF names; files
    named as save_pretrained names them, under the Hub's names): a plan's reads of them
    become these recipes."""

    @property
    def blocks(self) -> dict[int, ExpertBlock]:
        return self.parsed.blocks

    @property
    def is_moe(self) -> bool:
        return bool(self.blocks)

    @property
    def fp8_block(self) -> tuple[int, int]:
        return self.settings.fp8_block if self.settings else DEFAULT_FP8_BLOCK


def understand(tensors: Mapping[str, TensorMeta], config: dict | None,
               metadata: Mapping[str, str], label: str, from_: str | None = None,
               family: str | None = None, n_experts: int | None = None,
               config_file: str | None = None) -> Analysis:
    """Detect family and layout and parse the experts, without judging them.

    ``from_``, ``family`` and ``n_experts`` override what detection and config.json say.
    ``config_file`` names the file ``config`` was read from: the source is then a whole
    checkpoint, whose every MoE layer must be present; without it ``config`` is a dict
    given by a caller, and the source may be part of a model.
    """
    source = config_file or "the config given"
    _check_object(config, source)
    fam, family_source = _choose_family(tensors, config, metadata, family)
    tensors, made = _named_as_on_the_hub(tensors, fam)
    refuse_packed(tensors, fam, label)
    settings = config_settings(config, fam, source)
    if from_:
        layout, layout_source = layout_named(from_), "given as the source layout"
        if not layout.found_by_keys and metadata.get(LAYOUT_METADATA_KEY) != layout.name:
            raise MoekitError(f"the {layout.name} source layout is a Megatron-Core checkpoint "
                              f"folder's, which {label} is not (the folder tells it apart, "
                              "not the keys): leave the source layout out, or name the one "
                              "its tensors are in")
    else:
        layout = _detected_layout(tensors, fam, family_source, metadata, label)
        layout_source = ("recorded in the safetensors metadata"
                         if metadata.get(LAYOUT_METADATA_KEY) else "detected")
    parsed = layout.parse(dict(tensors), fam)
    count, count_source = _expert_count(parsed, settings, n_experts)
    return Analysis(label, fam, layout, parsed, count, tensors, count_source, settings,
                    config_file is not None, family_source, layout_source, config, made)


def _named_as_on_the_hub(tensors: Mapping[str, TensorMeta], family: Family
                         ) -> tuple[Mapping[str, TensorMeta], dict[str, Expr]]:
    """``tensors`` under the family's Hub names where they carry those transformers'
    save_pretrained writes instead (``Family.saved_as``), each the read of the tensor it
    renames (``Analysis.made``); ``tensors`` and no reads where none does. Files holding
    one tensor under both names are refused."""
    if not family.saved_as:
        return tensors, {}
    renamed = {key: rename(key, family.saved_as, reverse=True) for key in tensors}
    if all(key == hub for key, hub in renamed.items()):
        return tensors, {}
    first: dict[str, str] = {}
    for key, hub in renamed.items():
        other = first.setdefault(hub, key)
        if other != key:
            raise MoekitError(
                f"the source holds {printable(other)} and {printable(key)}, the {family.name} "
                f"Hub files' and transformers' save_pretrained's names of one tensor "
                f"({printable(hub)}): keep one of them")
    made: dict[str, Expr] = {hub: Read.whole(key, tensors[key]) for key, hub in renamed.items()}
    return made, made


def validate(analysis: Analysis, required: range | None = None,
             where: Callable[[str], str | None] = lambda key: None,
             total_experts: int | None = None) -> None:
    """Raise one MoekitError when the source's naming disagrees with its family or layout
    as a whole, else one PlanError listing every problem of the experts, grouped by layer.

    ``required`` limits the completeness checks to the experts the caller will read (an
    expert-parallel rank needs only its own); ``where(key)`` names the file a key is
    stored in, for messages; ``total_experts`` is the number of router rows when the source
    holds only some experts (an EP rank's state dict), else ``analysis.n_experts``.
    """
    disagreement = _naming_disagreement(analysis)
    if disagreement:
        raise MoekitError(disagreement)
    n = analysis.n_experts
    stored = analysis.made

    def stored_in(key: str) -> str | None:
        return where(reads(stored[key])[0].key if key in stored else key)

    problems = _problems(analysis, stored_in, range(n) if required is None else required,
                         n if total_experts is None else total_experts)
    if problems:
        raise PlanError(f"{analysis.label} ({analysis.family.name}, layout "
                        f"{analysis.layout.name}) is not a valid checkpoint:", _listed(problems))


def analyse(tensors: Mapping[str, TensorMeta], config: dict | None,
            metadata: Mapping[str, str], label: str, from_: str | None = None,
            where: Callable[[str], str | None] = lambda key: None,
            family: str | None = None, n_experts: int | None = None,
            config_file: str | None = None) -> Analysis:
    """``understand`` then ``validate`` every expert; refuse a source in a layout whose
    consumer converted tensors outside the experts that moekit cannot convert back."""
    analysis = understand(tensors, config, metadata, label, from_, family, n_experts,
                          config_file)
    validate(analysis, where=where)
    _check_source(analysis)
    return analysis


def _check_source(analysis: Analysis) -> None:
    """Refuse a source in a layout whose consumer converts tensors outside the experts that
    moekit cannot convert back (``Family.unconverted``), but for the layout the family's
    Hub files name their experts in (``Family.hub_layout``)."""
    if analysis.layout.name != analysis.family.hub_layout:
        _check_converted(analysis, analysis.layout, "source")


def understand_checkpoint(checkpoint: Checkpoint, from_: str | None = None) -> Analysis:
    """``understand`` a checkpoint's headers, as a whole model with its config.json; a
    checkpoint in a layout refused as a source (``_check_source``) is refused, as
    ``analyse`` refuses it, so that expert-parallel loads read no more than ``convert``."""
    analysis = understand(checkpoint.made or checkpoint.tensors, checkpoint.config,
                          checkpoint.metadata, str(checkpoint.named), from_=from_,
                          config_file=_config_file(checkpoint))
    _check_source(analysis)
    analysis.made = _chained(analysis.made, checkpoint.made)
    return analysis


def _chained(first: Mapping[str, Expr], then: Mapping[str, Expr]) -> dict[str, Expr]:
    """The recipes ``first`` gives its tensors, reading the tensors ``then`` makes (each
    alone where the other has none): a Megatron-Core checkpoint's tensors under HF names
    (``Checkpoint.made``), renamed as a family's Hub files name them."""
    if not first or not then:
        return dict(first or then)
    return {key: composed(recipe, then) for key, recipe in first.items()}


def _config_file(checkpoint: Checkpoint) -> str:
    return str(checkpoint.config_file)


@without_gc_pauses
def analyse_checkpoint(path: str | Path, from_: str | None = None,
                       config: str | Path | None = None) -> tuple[Checkpoint, Analysis]:
    """Read a checkpoint's headers (by ``config`` where given: ``Checkpoint.open``), detect
    its family and layout and validate its experts."""
    checkpoint = Checkpoint.open(path, config)
    return checkpoint, analyse_opened(checkpoint, from_)


@without_gc_pauses
def analyse_opened(checkpoint: Checkpoint, from_: str | None = None) -> Analysis:
    """Detect the family and layout of a checkpoint whose headers are read, and validate
    its experts."""
    analysis = analyse(checkpoint.made or checkpoint.tensors, checkpoint.config,
                       checkpoint.metadata, str(checkpoint.named), from_=from_,
                       where=checkpoint.file_of, config_file=_config_file(checkpoint))
    analysis.made = _chained(analysis.made, checkpoint.made)
    return analysis


@without_gc_pauses
def build_plan(analysis: Analysis, dst: Layout, experts: range | None = None,
               offset: int = 0, dequantize: bool = False) -> Plan:
    """The plan that writes ``analysis``'s checkpoint in layout ``dst``.

    ``experts`` keeps only those experts of every MoE block, renumbered from ``offset``
    (an expert-parallel rank loads ``experts=its range``, and saves its local experts
    with ``offset=the range's start``). ``dequantize`` writes every FP8 weight that has
    block scales (experts and others) as bf16, without its scales. Pieces that the
    destination would join into one tensor must share a dtype: nothing is rounded.
    """
    if not analysis.is_moe and dst.grouped:
        raise MoekitError(
            f"the source holds no expert tensors (a dense model, family "
            f"{analysis.family.name}): the {dst.name} layout applies only to MoE checkpoints; "
            + (unread_experts(analysis.settings) if analysis.settings
               and analysis.settings.declared else
               "use `moekit upcycle` to turn a dense model into an MoE"))
    if not dst.names_family(analysis.family):
        raise MoekitError(dst.unnamed(analysis.family))
    if not analysis.layout.names_family(analysis.family):
        missing = ("" if (analysis.config or {}).get("model_type") else
                   f" (no config.json beside it names its model type: {NAME_A_CONFIG})")
        raise MoekitError(f"cannot read {analysis.label}{missing}: "
                          f"{analysis.layout.unnamed(analysis.family)}")
    if analysis.family.expert_groups and (experts is not None or offset):
        raise MoekitError(split_groups_refusal(analysis.family))
    block_size = analysis.fp8_block
    if dequantize:
        _check_dequantizable(analysis)
    blocks = {layer: _dequantized(block, block_size) if dequantize else block
              for layer, block in analysis.blocks.items()}
    _check_held(blocks, analysis, dst, dequantize, experts)
    _check_converted(analysis, dst, dequantize=dequantize, experts=experts)
    _check_placed(analysis, dst)
    _check_needed(analysis, dst)
    _check_mtp_layers(analysis, dst)
    _check_scale_grids(analysis, blocks, dst, block_size, experts)
    src = analysis.layout
    chosen = range(analysis.n_experts) if experts is None else experts
    by_layer: dict[int, list[TensorPlan]] = {
        layer: _emitted(dst, block, chosen, offset, analysis.family)
        for layer, block in sorted(blocks.items())}
    _check_joined_dtypes(analysis, blocks, by_layer, dst)
    expert_names = {t.name for emitted in by_layer.values() for t in emitted}
    layer_of_key = {key: layer for layer, block in analysis.blocks.items()
                    for key in _source_keys(block)}
    parts = _group_parts(analysis, dst)
    tensors: list[TensorPlan] = []
    for key in analysis.tensors:
        if key in layer_of_key:
            tensors.extend(by_layer.pop(layer_of_key[key], []))
        elif key in parts:
            tensors.extend(parts[key])
        elif key not in analysis.parsed.claimed:
            recipe = _passed_through(key, analysis.tensors, dequantize, block_size)
            if recipe is not None:
                hf_key = src.to_hf_key(key, analysis.family)
                name = dst.from_hf_key(hf_key, analysis.family)
                tensors.append(TensorPlan(name, _reshaped(recipe, key, hf_key, src, dst,
                                                          analysis.family)))
                _check_renamed_back(key, name, src, dst, analysis.family)
    _check_unique(tensors)
    plan = Plan(analysis.family.name, src.name, dst.name, tensors,
                {layer: len(chosen) for layer in sorted(analysis.blocks)}, expert_names)
    if analysis.made:
        plan = composed_plan(plan, analysis.made)
    return dst.whole_model(plan, analysis.config, analysis.family, analysis.label)


def split_groups_refusal(family: Family) -> str:
    """Why expert parallelism is refused for a family whose layers hold several groups of
    experts."""
    groups = ", ".join(group.name for group in family.expert_groups)
    return (f"the {family.name} experts lie in {len(family.expert_groups)} groups in each "
            f"MoE layer ({groups}), each with its own router, which moekit's expert "
            "parallelism does not split (it splits one group of experts over the ranks); "
            "convert the whole checkpoint instead")


def _holds_groups_apart(layout: Layout, family: Family) -> bool:
    """True when ``layout`` holds each of the family's expert groups in a module of its own
    (transformers' ``text_moe``, ``vision_moe``), where the HF files number them in one
    sequence."""
    return isinstance(layout, GroupedLayout) and bool(layout.places(family)) and \
        bool(family.expert_groups)


def _group_parts(analysis: Analysis, dst: Layout) -> dict[str, list[TensorPlan]]:
    """The expert groups' tensors outside the experts (``ExpertGroup.parts``: routers,
    score-correction biases) when the source holds the groups otherwise than ``dst``
    (``_holds_groups_apart``): each source key read -> the destination tensors written
    where it stands (all at the first key of those a tensor joins). Empty when both hold
    them alike, which the family's renames then cover."""
    family, src = analysis.family, analysis.layout
    apart = _holds_groups_apart(dst, family)
    if not family.expert_groups or _holds_groups_apart(src, family) == apart:
        return {}
    module = (dst if apart else src).name
    out: dict[str, list[TensorPlan]] = {}
    for block in analysis.blocks.values():
        joined: dict[str, list[tuple[int, GroupPart, str]]] = defaultdict(list)
        for k, group in enumerate(family.expert_groups):
            for part in group.parts:
                named = f"{block.block}.{group.modules[module]}.{part.name}"
                joined[f"{block.block}.{part.hf}"].append((k, part, named))
        for hf_key, members in joined.items():
            if apart:
                _split_part(analysis, dst, hf_key, members, out)
            else:
                _join_part(analysis, dst, hf_key, members, out)
    return out


def _split_part(analysis: Analysis, dst: Layout, hf_key: str,
                members: list[tuple[int, GroupPart, str]], out: dict[str, list[TensorPlan]]
                ) -> None:
    """The groups' tensors that one tensor of the HF files holds (a router stored [H, E],
    or the score-correction biases of every group, a row each), as ``dst`` holds them."""
    key = analysis.layout.from_hf_key(hf_key, analysis.family)
    meta = analysis.tensors.get(key)
    if meta is None:
        return
    made = out.setdefault(key, [])
    for group, part, named in members:
        recipe: Expr = Read.whole(key, meta)
        if part.row:
            recipe = Read(key, (slice(group, group + 1),), (1, *meta.shape[1:]), meta.dtype)
        elif part.transposed:
            recipe = Transpose(recipe)
        made.append(TensorPlan(dst.from_hf_key(named, analysis.family), recipe))


def _join_part(analysis: Analysis, dst: Layout, hf_key: str,
               members: list[tuple[int, GroupPart, str]], out: dict[str, list[TensorPlan]]
               ) -> None:
    """One tensor of the HF files from the groups' tensors it holds (a router, transposed;
    every group's score-correction bias, a row each), placed at the first of them."""
    family, src = analysis.family, analysis.layout
    keys = [src.from_hf_key(named, family) for _, _, named in members]
    present = [key for key in keys if key in analysis.tensors]
    if not present:
        return
    if len(present) < len(keys):
        missing = next(key for key in keys if key not in analysis.tensors)
        raise MoekitError(f"the source has {present[0]} but not {missing}, which the "
                          f"{dst.name} layout joins with it into {hf_key}")
    parts = [Read.whole(key, analysis.tensors[key]) for key in keys]
    part = members[0][1]
    if part.row:
        recipe: Expr = Concat(tuple(parts), dim=0)
    else:
        recipe = Transpose(parts[0]) if part.transposed else parts[0]
    out[present[0]] = [TensorPlan(dst.from_hf_key(hf_key, family), recipe)]
    out.update({key: [] for key in present[1:]})


def unread_experts(settings: Settings) -> str:
    """What to say when a config declares routed experts but no tensor reads as one: a
    family whose experts moekit does not know (or Doge's single-neuron experts, which no
    grouped layout holds)."""
    count, key = settings.declared
    return (f"{settings.source} declares {count} routed experts ({key}), but no tensor is "
            "named as the experts of a family moekit knows; these experts stay as they are "
            "(--to hf copies the checkpoint)")


def _emitted(dst: Layout, block: ExpertBlock, chosen: range, offset: int, family: Family
             ) -> list[TensorPlan]:
    """The destination tensors of ``block``'s experts ``chosen`` (renumbered from
    ``offset``); for none chosen, what the layout holds for no expert (zero-row grouped
    tensors)."""
    if not chosen:
        return dst.emit_none(block, family)
    return dst.emit(select_experts(block, chosen, offset), offset + len(chosen), family)


def _check_held(blocks: Mapping[int, ExpertBlock], analysis: Analysis, dst: Layout,
                dequantize: bool, experts: range | None) -> None:
    """Refuse a destination layout with no place for some of the experts' pieces (expert
    biases in nemo), rather than drop them, offering the layouts that hold them to which
    the checkpoint's ``experts`` convert, and ``--dequantize`` where ``dst`` then takes
    them."""
    family = analysis.family
    lost = lost_pieces(blocks, family, dst)
    if lost:
        can = _converting(analysis, [name for name, layout in LAYOUTS.items()
                                     if all(layout.holds(p, family) for p in lost)],
                          dequantize, experts)
        dequantized = _quantized(lost) and not dequantize and _converting(
            analysis, [dst.name], True, experts)
        raise MoekitError(held_refusal(lost, family, dst) + "; moekit refuses to drop them"
                          + (f". Layouts that hold them: {', '.join(can)}" if can else "")
                          + ("; or pass --dequantize to write bf16 weights" if dequantized
                             else ""))


def lost_pieces(blocks: Mapping[int, ExpertBlock], family: Family, dst: Layout) -> list[str]:
    """The pieces of the experts in ``blocks`` that ``dst`` has no place for, sorted."""
    present = {piece for block in blocks.values() for piece, _ in block.pieces}
    return sorted(p for p in present if not dst.holds(p, family))


def held_refusal(lost: list[str], family: Family, dst: Layout) -> str:
    """Why ``dst`` cannot hold the ``family`` experts' pieces ``lost`` (``lost_pieces``),
    with the layout's note on quantised pieces; empty where none is lost."""
    if not lost:
        return ""
    note = dst.quantized_note if _quantized(lost) else ""
    return (f"the {dst.name} layout cannot hold the {family.name} experts' {', '.join(lost)}"
            + (f" ({note})" if note else ""))


def _quantized(pieces: Iterable[str]) -> bool:
    """True when some of ``pieces`` are FP8 scales or MXFP4 blocks or scales."""
    return any(p.endswith((SCALE, MX_BLOCKS, MX_SCALES)) for p in pieces)


def _check_converted(analysis: Analysis, layout: Layout, role: str = "destination",
                     dequantize: bool = False, experts: range | None = None) -> None:
    """Refuse ``layout`` as the source or destination of the checkpoint's family where its
    consumer converts tensors outside the experts that moekit does not
    (``Family.unconverted``): written, the result would not be what the layout promises;
    read, those tensors would pass through under names and shapes that no other layout
    has. A destination refused offers the layouts to which the checkpoint's ``experts``
    convert."""
    family = analysis.family
    refusal = converted_refusal(family, layout, role)
    if refusal:
        can = converted_layouts(family, LAYOUTS)
        if role == "destination":
            can = _converting(analysis, can, dequantize, experts)
        raise MoekitError(refusal + (f"; use {', '.join(can)} instead" if can else "")
                          + (" (the hf layout is what from_pretrained reads)"
                             if HF.name in can else ""))


_TRYING: ContextVar[bool] = ContextVar("moekit_planner_trying", default=False)
"""True while a caller tries layouts and drops their refusals (``trying_layouts``)."""


@contextmanager
def trying_layouts() -> Iterator[None]:
    """Within, refusals offer no layouts to use instead (``_converting`` gives none): a
    caller that tries a layout drops its refusal, and finding what it would offer plans
    the checkpoint again in each candidate (whose own refusals would try again)."""
    trying = _TRYING.set(True)
    try:
        yield
    finally:
        _TRYING.reset(trying)


def _converting(analysis: Analysis, names: Iterable[str], dequantize: bool,
                experts: range | None) -> list[str]:
    """Those of the layouts ``names`` in which ``analysis``'s checkpoint plans (its
    ``experts``, with ``dequantize``), each planned: a layout that holds the experts'
    pieces and is not refused for the family may still be refused for the checkpoint
    (transformers' joined FP8 scale grid, Megatron-Core's config entries,
    multi-token-prediction layers), and a refusal offers only layouts that then convert.
    Empty while trying (``trying_layouts``)."""
    if _TRYING.get():
        return []
    with trying_layouts():
        return [name for name in names
                if _plans(analysis, LAYOUTS[name], dequantize, experts)]


def _plans(analysis: Analysis, dst: Layout, dequantize: bool, experts: range | None) -> bool:
    try:
        build_plan(analysis, dst, experts, dequantize=dequantize)
    except MoekitError:
        return False
    return True


def converted_refusal(family: Family, layout: Layout, role: str = "destination") -> str:
    """Why ``layout`` is refused as the ``role`` of ``family`` (``Family.unconverted``),
    without the layouts to use instead; empty where it is not refused."""
    reason = family.unconverted.get(layout.name)
    if not reason:
        return ""
    return (f"the {layout.name} layout of {family.name} is refused as a {role}: {reason} on "
            "load, which moekit does not (nor undoes), so the result would not be what the "
            "layout promises")


def converted_layouts(family: Family, names: Iterable[str]) -> list[str]:
    """Those of the layouts ``names`` (in their order) that have names for ``family``
    and whose consumer holds its tensors as moekit writes them (``Family.unconverted``):
    what a refusal offers instead, of the layouts its command takes."""
    return [name for name in names
            if name not in family.unconverted and LAYOUTS[name].names_family(family)]


def _check_placed(analysis: Analysis, dst: Layout) -> None:
    """Refuse a source holding tensors outside the experts that ``dst``'s consumer has no
    place for (``Family.unplaced``), naming the first of them and why, rather than write
    a checkpoint its strict load refuses."""
    family = analysis.family
    unplaced = family.unplaced.get(dst.name)
    if not unplaced:
        return
    passed = ((key, analysis.layout.to_hf_key(key, family)) for key in analysis.tensors
              if key not in analysis.parsed.claimed)
    found = [(key, why) for key, hf_key in passed for ending, why in unplaced.items()
             if hf_key.endswith(ending)]
    if found:
        (key, why), more = found[0], len(found) - 1
        raise MoekitError(
            f"the {dst.name} layout has no place for {key}"
            + (f" (and {more} more {plural(more, 'tensor')} of the source)" if more else "")
            + f": {why}; moekit refuses to drop them: write another layout (hf keeps them)")


def _check_needed(analysis: Analysis, dst: Layout) -> None:
    """Refuse a source whose MoE block holds its router but lacks a tensor that ``dst``'s
    consumer holds beside it (``Layout.needs``), naming the first missing one and why,
    rather than write a checkpoint its strict load refuses. A block whose router is not in
    the source (a state dict of the experts alone), or not one tensor (``Family.router``),
    is not checked."""
    family, src = analysis.family, analysis.layout
    if family.router is None:
        return
    missing = []
    for block in analysis.blocks.values():
        if src.from_hf_key(f"{block.block}.{family.router}", family) not in analysis.tensors:
            continue
        missing += [(key, why) for key, why in (
            (src.from_hf_key(hf_key, family), why)
            for hf_key, why in dst.needs(block.block, family).items())
            if key not in analysis.tensors]
    if missing:
        (key, why), more = missing[0], len(missing) - 1
        raise MoekitError(
            f"the source has no {key}"
            + (f" (nor {more} more {plural(more, 'tensor')} of its kind)" if more else "")
            + f", which the {dst.name} layout holds: {why}")


def _check_mtp_layers(analysis: Analysis, dst: Layout) -> None:
    """Refuse a source holding multi-token-prediction layers (the config's layers after
    ``num_hidden_layers``) where ``dst`` has no names for them (``Layout.mtp_note``) or
    holds the family's otherwise (``Family.mtp_unheld``)."""
    note = dst.mtp_note or analysis.family.mtp_unheld.get(dst.name, "")
    rule = analysis.settings.moe_layers if analysis.settings else None
    if not note or rule is None:
        return
    present = _layers_after(analysis, rule.count)
    if present:
        raise MoekitError(
            f"the source holds multi-token-prediction layers (layer "
            f"{', '.join(map(str, present))}, after num_hidden_layers {rule.count}): "
            f"{note}; use another layout, or a checkpoint without them")


def _layers_after(analysis: Analysis, count: int) -> list[int]:
    """The layers from ``count`` on that the source holds tensors of, experts or not
    (Step-3.7's multi-token-prediction layers have dense MLPs)."""
    layer_of = layer_numbers(analysis)
    found = {layer_of(key) for key in analysis.tensors}
    return sorted(layer for layer in (found - {None}) | set(analysis.blocks) if layer >= count)


def layer_numbers(analysis: Analysis) -> Callable[[str], int | None]:
    """The decoder layer a source tensor (a key of ``analysis.tensors``) belongs to, read
    off the number after the family's layer prefix in its HF name; None for a tensor
    outside the decoder layers, such as a vision tower's ``encoder.layers.N``."""
    family, layout = analysis.family, analysis.layout
    number = re.compile(re.escape(family.block.split("{layer}")[0]) + r"(\d+)\.", re.ASCII)

    def layer_of(key: str) -> int | None:
        match = number.match(layout.to_hf_key(key, family))
        return int(match[1]) if match else None

    return layer_of


def _check_scale_grids(analysis: Analysis, blocks: Mapping[int, ExpertBlock], dst: Layout,
                       block_size: tuple[int, int], experts: range | None) -> None:
    """Refuse FP8 gate and up scales read from, or written to, one grid over the joined
    gate+up rows (transformers' fused FP8 experts: max(ceil(2I/rows), 2) rows) when I is
    not a whole number of blocks: a block of that grid then spans gate and up rows that
    the per-projection grids scale apart (or, for I below half a block, the grid's second
    row scales nothing), so no byte copy is exact."""
    family = analysis.family
    for layout, held, verb in ((analysis.layout, analysis.blocks, "reads"),
                               (dst, blocks, "writes")):
        if not layout.joins_scale_blocks(family):
            continue
        sizes = sorted({part.shape[0] for block in held.values()
                        for (piece, e), part in block.pieces.items()
                        if piece == "gate" and ("gate" + SCALE, e) in block.pieces})
        odd = [size for size in sizes if size % block_size[0]]
        if odd:
            raise MoekitError(
                f"the {layout.name} layout {verb} the FP8 block scales of gate and up as one "
                f"grid over their joined {2 * odd[0]} rows (transformers' fused FP8 experts), "
                f"in blocks of {block_size[0]} rows; with an expert intermediate size of "
                f"{odd[0]}, not a multiple of {block_size[0]}, a block spans gate and up rows "
                "that their own scales cover separately, so moekit cannot move the scales "
                "exactly: " + (_unjoined(analysis, dst, experts) if verb == "writes" else
                               "no moekit conversion reads these scales exactly"))


def _unjoined(analysis: Analysis, dst: Layout, experts: range | None) -> str:
    """What to write instead of FP8 scales ``dst`` would join over gate+up (the source's
    scales are not dequantized, or they would not be written): bf16 weights where ``dst``
    then takes them, or the hf or vllm layout (per-projection grids) where the checkpoint
    converts to it."""
    remedies = ["pass --dequantize to write bf16 weights"] if _converting(
        analysis, [dst.name], True, experts) else []
    can = _converting(analysis, ("hf", "vllm"), False, experts)
    remedies += [f"write the {' or '.join(can)} layout"] if can else []
    return ", or ".join(remedies) or "no moekit conversion writes these scales exactly"


def _check_joined_dtypes(analysis: Analysis, blocks: Mapping[int, ExpertBlock],
                         by_layer: Mapping[int, list[TensorPlan]], dst: Layout) -> None:
    """Refuse a destination tensor that would join pieces of different dtypes (gate BF16
    and up F32 in one gate+up tensor): writing it would round one of them."""
    problems = []
    for layer, emitted in by_layer.items():
        for tensor in emitted:
            mixed = _mixed_dtypes(tensor.recipe)
            if mixed:
                held = _piece_dtypes(blocks[layer], analysis)
                problems.append(_Problem(
                    f"the {dst.name} layout keeps pieces of different dtypes ({held}) in one "
                    f"tensor, {tensor.name.rsplit('.', 1)[-1]}; moekit does not round one into "
                    "the other: convert to a layout that keeps them apart (hf), or give them "
                    "one dtype first", layer))
                break
    if problems:
        raise PlanError(f"cannot write {analysis.label} in the {dst.name} layout:",
                        _listed(problems))


def _mixed_dtypes(expr: Expr) -> bool:
    """True when a stack or concatenation inside ``expr`` joins parts of different dtypes.
    Below a stack only its first part is looked into: validation gave every expert's piece
    one dtype, so the experts' parts are built alike (and the evaluator refuses a read of
    another dtype all the same)."""
    pending = [expr]
    while pending:
        node = pending.pop()
        if isinstance(node, (Stack, Concat)):
            if len({part.dtype for part in node.parts}) > 1:
                return True
            pending.extend(node.parts[:1] if isinstance(node, Stack) else node.parts)
        elif isinstance(node, (Transpose, Reshape)):
            pending.append(node.part)
    return False


def _piece_dtypes(block: ExpertBlock, analysis: Analysis) -> str:
    """Each projection's dtype in a block, e.g. ``gate_proj BF16, up_proj F32, down_proj F32``."""
    seen: dict[str, str] = {}
    for (piece, _), part in block.pieces.items():
        seen.setdefault(piece, part.dtype)
    name = _namer(analysis)
    return ", ".join(f"{name(p)} {seen[p]}" for p in analysis.family.all_pieces if p in seen)


def _check_dequantizable(analysis: Analysis) -> None:
    """Refuse to dequantise a weight with block scales that is not float8: multiplying a
    weight already in BF16 (say) by its leftover scales would write wrong values."""
    name = _namer(analysis)
    problems = []
    for layer, block in analysis.blocks.items():
        scaled = {(piece[:-len(SCALE)], e) for piece, e in block.pieces if piece.endswith(SCALE)}
        odd = sorted({(piece, block.pieces[(piece, e)].dtype) for piece, e in scaled
                      if (piece, e) in block.pieces and not _is_fp8(block.pieces[(piece, e)])})
        problems += [_Problem(f"{name(piece)} is {dtype} beside block scales", layer)
                     for piece, dtype in odd]
    for key in analysis.tensors:
        weight = analysis.tensors.get(key.removesuffix(FP8_SCALE_KEY))
        if (key.endswith(FP8_SCALE_KEY) and key not in analysis.parsed.claimed
                and weight is not None and not _is_fp8(weight)):
            problems.append(_Problem(f"{key.removesuffix(FP8_SCALE_KEY)} is {weight.dtype} "
                                     "beside block scales"))
    if problems:
        raise PlanError(f"cannot dequantize {analysis.label}: moekit dequantizes float8 "
                        "weights (F8_E4M3, F8_E5M2) by their block scales; these weights are "
                        "not float8, so their scales do not apply to them:", _listed(problems))


def _is_fp8(tensor: TensorMeta) -> bool:
    return tensor.dtype.startswith("F8")


def _dequantized(block: ExpertBlock, block_size: tuple[int, int]) -> ExpertBlock:
    """The block with every FP8 weight (and its scale) and every MXFP4 weight (its blocks
    and scales) replaced by the bf16 weight."""
    pieces = dict(block.pieces)
    for (piece, e), part in block.pieces.items():
        if piece.endswith(SCALE):
            weight = piece[:-len(SCALE)]
            pieces[(weight, e)] = Dequantize(pieces[(weight, e)], part, block=block_size)
            del pieces[(piece, e)]
        elif piece.endswith(MX_BLOCKS):
            weight = piece[:-len(MX_BLOCKS)]
            pieces[(weight, e)] = DequantizeMXFP4(part, pieces.pop((weight + MX_SCALES, e)))
            del pieces[(piece, e)]
    names = {k: v for k, v in block.names.items() if k in pieces}
    return ExpertBlock(block.layer, block.block, pieces, names)


def _passed_through(key: str, tensors: Mapping[str, TensorMeta], dequantize: bool,
                    block_size: tuple[int, int]) -> Expr | None:
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
    return Dequantize(read, Read.whole(key + FP8_SCALE_KEY, scale), block=block_size)


def select_experts(block: ExpertBlock, experts: range, offset: int = 0) -> ExpertBlock:
    """The block with only ``experts``, renumbered so that ``experts[0]`` becomes ``offset``
    (the block itself when that changes nothing, as in a whole-checkpoint conversion)."""
    if experts.start == offset and all(e in experts for e in {e for _, e in block.pieces}):
        return block
    shift = offset - experts.start
    return ExpertBlock(block.layer, block.block,
                       {(p, e + shift): v for (p, e), v in block.pieces.items() if e in experts},
                       {(p, e + shift): v for (p, e), v in block.names.items() if e in experts})


def _source_keys(block: ExpertBlock) -> set[str]:
    return set(block.names.values())


def _piece_names(block: ExpertBlock) -> set[str]:
    """The pieces (``gate``, ``up_scale``, ...) that some expert of ``block`` holds."""
    return {piece for piece, _ in block.pieces}


def _reshaped(recipe: Expr, key: str, hf_key: str, src: Layout, dst: Layout,
              family: Family) -> Expr:
    """``recipe`` in the shape the family's renames give the tensor in ``dst`` (a squeezing
    rename: NeMo's ERNIE-4.5 score-correction bias [E] for the files' [1, E]); refused
    where the dimension to drop is not 1."""
    shape = renamed_shape(key, tuple(recipe.shape), family.renames.get(src.name, ()),
                          reverse=True)
    shape = renamed_shape(hf_key, shape, family.renames.get(dst.name, ()))
    if shape is None:
        raise MoekitError(f"{printable(key)} is {list(recipe.shape)}: the {dst.name} layout of "
                          f"{family.name} holds it without its leading dimension, which is "
                          "not 1 here")
    return recipe if shape == tuple(recipe.shape) else Reshape(recipe, shape)


def _check_renamed_back(key: str, name: str, src: Layout, dst: Layout, family: Family) -> None:
    """Refuse a tensor that the family's renames would not give back its name when read
    back (a top-level ``lm_head.weight`` beside Qwen3-Omni's thinker, which NeMo holds
    without ``thinker.``): its copy would pass for another tensor."""
    back = src.from_hf_key(dst.to_hf_key(name, family), family)
    if back != key:
        raise MoekitError(f"{printable(key)} would be written as {printable(name)}, which the "
                          f"{dst.name} layout of {family.name} reads back as "
                          f"{printable(back)}: moekit refuses to write a tensor under a name "
                          "that does not lead back to it")


def _check_unique(tensors: list[TensorPlan]) -> None:
    seen = Counter(t.name for t in tensors)
    clashes = [name for name, n in seen.items() if n > 1]
    if clashes:
        raise MoekitError(f"the conversion would write {len(clashes)} tensor name(s) twice, "
                          f"e.g. {clashes[0]}: the source holds both an expert tensor and a "
                          "tensor already named like its converted form")


# -- family, layout and config --------------------------------------------------------------

def family_called(name: str) -> Family:
    """The family named ``name``; a MoekitError lists the known ones otherwise."""
    found = family_named(name) if isinstance(name, str) else None
    if found is None:
        known = ", ".join(f.name for f in FAMILIES)
        raise MoekitError(f"unknown model family {name!r}; known families: {known}")
    return found


def checked_expert_count(value: object) -> int:
    """An expert count given by a caller (``n_experts``), once it is a whole number from
    0 to ``MAX_EXPERTS``."""
    if type(value) is not int or not 0 <= value <= MAX_EXPERTS:
        raise MoekitError(f"n_experts is {value!r}; expected a whole number from 0 to "
                          f"{MAX_EXPERTS}")
    return value


def _choose_family(tensors: Mapping[str, TensorMeta], config: dict | None,
                   metadata: Mapping[str, str], given: str | None) -> tuple[Family, str]:
    """The family and how it was chosen, for messages. A config whose model_type is
    another known family's contradicts the choice and is refused."""
    model_type = (config or {}).get("model_type")
    if given:
        family, source = family_called(given), "given"
    else:
        family = detect_family(tensors, config, metadata)
        if family_named(metadata.get(FAMILY_METADATA_KEY, "")) is family:
            source = "recorded in the safetensors metadata"
        elif isinstance(model_type, str) and model_type in family.model_types:
            source = f"config.json model_type {model_type}"
        else:
            source = "recognised from the key names"
    other = family_of_model_type(model_type) if isinstance(model_type, str) else None
    if other is not None and other is not family:
        raise MoekitError(f"the model family is {family.name} ({source}), but the config's "
                          f"model_type {model_type} is family {other.name}'s: the config and "
                          "the weights disagree; pass the family the weights are, or the "
                          "config that belongs to them")
    return family, source


def _detected_layout(tensors: Mapping[str, TensorMeta], family: Family, family_source: str,
                     metadata: Mapping[str, str], label: str) -> Layout:
    """``detect_layout``; when no layout reads the expert tensors, the family disagreement
    that explains it (keys named as another family's), if there is one."""
    try:
        return detect_layout(tensors, family, metadata, label)
    except MoekitError as err:
        other = _other_family(label, family, family_source, tensors, _expert_keys(tensors))
        raise MoekitError(other or str(err)) from None


def config_settings(config: dict | None, family: Family, source: str) -> Settings | None:
    """What ``config`` says of the experts, read through ``family``'s rules (the layer
    rule only when the config is the family's own: its model_type, or none given), every
    value checked; ``source`` names the config in messages."""
    if config is None:
        return None
    _check_object(config, source)
    values = _text_model_values(config, family, source)
    own = bool(family.model_types) and config.get("model_type") in (*family.model_types, None)
    layers = family.moe_layers(values) if own and family.moe_layers else None
    declared = expert_count(values, family.expert_count_keys)
    if declared and family.expert_groups:
        count, key = declared
        declared = (count * family.n_groups, f"{key} {count} in each of the "
                                             f"{family.n_groups} expert groups")
    if declared and declared[0] > MAX_EXPERTS:
        raise MoekitError(f"{values.source}: {declared[1]} is {declared[0]}, more routed "
                          f"experts than moekit plans for in a layer ({MAX_EXPERTS})")
    extra = family.router_extra_rows
    router_extra = (values.integer(extra), extra) if extra and extra in values else None
    return Settings(values.source, declared, layers, fp8_block(ConfigValues(config, source)),
                    router_extra)


def _text_model_values(config: Mapping, family: Family, source: str) -> ConfigValues:
    """The config of the model holding the experts: ``family.text_config``'s section of a
    multimodal config (``text_config``) where the config has it, else the config itself."""
    section, path = config, []
    for key in family.text_config:
        inner = section.get(key)
        if not isinstance(inner, Mapping):
            break
        section, path = inner, [*path, key]
    return ConfigValues(section, f"{source} {'.'.join(path)}" if path else source)


def _check_object(config: object, source: str) -> None:
    if config is not None and not isinstance(config, Mapping):
        raise MoekitError(f"{source} is a {type(config).__name__}; expected a JSON object "
                          "(a dict of settings)")


def _expert_count(parsed: ParsedExperts, settings: Settings | None, given: int | None
                  ) -> tuple[int, str]:
    """(experts per MoE layer, where that comes from): ``given``, else the config's, else
    one more than the highest expert number found (below ``MAX_EXPERTS``)."""
    if given is not None:
        return checked_expert_count(given), f"given (n_experts={given})"
    if settings is not None and settings.declared is not None:
        count, key = settings.declared
        return count, f"{settings.source} declares ({key})"
    return _highest_expert(parsed), FOUND


def _highest_expert(parsed: ParsedExperts) -> int:
    """One more than the highest expert number below ``MAX_EXPERTS`` (higher ones are
    reported as beyond the count)."""
    return max((e + 1 for block in parsed.blocks.values() for _, e in block.pieces
                if e < MAX_EXPERTS), default=0)


# -- naming disagreements: one message, not one line per tensor ----------------------------

def _naming_disagreement(analysis: Analysis) -> str | None:
    """One message when most tensors of the experts' modules are named otherwise than the
    family and layout read (a wrong source layout, or a config of another family), naming
    the layout or family they fit; None when the naming agrees, or when no other reads
    them better (their problems are then listed one by one)."""
    parsed = analysis.parsed
    if not parsed.claimed:
        return _other_family(analysis.label, analysis.family, analysis.family_source,
                             analysis.tensors, _expert_keys(analysis.tensors))
    read = _read_keys(parsed)
    if len(parsed.claimed - read) * 2 <= len(parsed.claimed):
        return None
    unread = [key for key in analysis.tensors if key in parsed.claimed and key not in read]
    sample = {key: analysis.tensors[key] for key in islice(unread, SAMPLE)}
    scores = {name: len(_read_keys(layout.parse(dict(sample), analysis.family)))
              for name, layout in BY_KEYS.items() if layout is not analysis.layout}
    best = max(scores, key=lambda name: scores[name], default=None)
    if best is None or scores[best] * 2 <= len(sample):
        return _other_family(analysis.label, analysis.family, analysis.family_source,
                             analysis.tensors, list(sample))
    how = analysis.layout_source
    advice = (f"pass --from {best} (from_='{best}'), or leave it out to detect the layout"
              if how.startswith("given") else f"pass --from {best} (from_='{best}')")
    return (f"{analysis.label}: the {analysis.layout.name} layout ({how}) reads "
            f"{'none' if len(read) == 0 else f'only {len(read)}'} of the "
            f"{len(parsed.claimed)} tensors in the {analysis.family.name} expert modules "
            f"(e.g. {unread[0]}); the keys look like layout {best}: {advice}")


def _other_family(label: str, ours: Family, family_source: str,
                  tensors: Mapping[str, TensorMeta], keys: list[str]) -> str | None:
    """The message when ``keys`` (expert-module keys family ``ours`` does not read) read as
    other families' expert tensors; None when none reads them."""
    if not keys:
        return None
    sample = {key: tensors[key] for key in keys[:SAMPLE]}
    scores: dict[tuple[str, str], int] = {}
    read: dict[tuple, int] = {}
    for family in (*FAMILIES, *GENERIC_FAMILIES):
        if family is ours:
            continue
        for layout in BY_KEYS.values():
            alike = (family.expert_naming, layout.name)
            if alike not in read:
                read[alike] = len(_read_keys(layout.parse(_as_on_the_hub(sample, family),
                                                          family)))
            scores[(family.name, layout.name)] = read[alike]
    best = max(scores.values(), default=0)
    if best * 2 <= len(sample):
        return None
    fits = [pair for pair, score in scores.items() if score == best]
    families = ", ".join(dict.fromkeys(name for name, _ in fits))
    layouts = ", ".join(dict.fromkeys(layout for _, layout in fits))
    return (f"{label}: the model family is {ours.name} ({family_source}), whose experts are "
            f"named {ours.block}.experts.{{expert}}.{{{','.join(ours.projections.values())}}}, "
            f"but the expert tensors are named as in {families} ({layouts} layout), e.g. "
            f"{keys[0]}: the family and the weights disagree; name the family the weights are "
            "(family=), or fix config.json's model_type")


def _as_on_the_hub(tensors: Mapping[str, TensorMeta], family: Family) -> dict[str, TensorMeta]:
    """``tensors`` under ``family``'s Hub names where they carry save_pretrained's
    (``Family.saved_as``), so that files so named are told to be that family's."""
    return {rename(key, family.saved_as, reverse=True): meta for key, meta in tensors.items()}


def _expert_keys(tensors: Mapping[str, TensorMeta]) -> list[str]:
    """Up to ``SAMPLE`` keys inside some experts module (``.experts.``)."""
    return list(islice((key for key in tensors if ".experts." in key), SAMPLE))


def _read_keys(parsed: ParsedExperts) -> set[str]:
    """The source keys a parse read expert pieces from."""
    return set().union(*(block.names.values() for block in parsed.blocks.values()))


# -- validation ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Problem:
    """One problem: its text, the layer it concerns, the files that hold it."""

    text: str
    layer: int | None = None
    files: tuple[str, ...] = ()
    stored: bool = False
    """True when ``files`` are where the layer is stored (not the named tensor's file)."""

    def line(self, layers: list[int] | None = None, files: tuple[str, ...] | None = None) -> str:
        """The problem's line, or the line of the same problem in ``layers``."""
        layers = [self.layer] if layers is None and self.layer is not None else layers or []
        files = self.files if files is None else files
        head = (f"{plural(len(layers), 'layer')} {compress_ranges(layers)}: " if layers else "")
        if not files:
            return head + self.text
        where = ("layers stored in " if len(layers) > 1 else "layer stored in ") \
            if self.stored else "in "
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more files"
                                         if len(files) > 3 else "")
        return f"{head}{self.text} ({where}{shown})"


def _listed(problems: list[_Problem]) -> list[str]:
    """One line per problem, in layer order; when there are more than PlanError shows, the
    same problem in several layers is one line (``layers 0-47: experts 6-7 lack ...``)."""
    ordered = sorted(problems, key=lambda p: -1 if p.layer is None else p.layer)
    if len(ordered) <= PlanError.LISTED:
        return [p.line() for p in ordered]
    groups: dict[tuple[str, bool], list[_Problem]] = {}
    for problem in ordered:
        groups.setdefault((problem.text, problem.stored), []).append(problem)
    lines = []
    for same in groups.values():
        layers = sorted({p.layer for p in same if p.layer is not None})
        files = tuple(sorted({f for p in same for f in p.files}))
        lines.append(same[0].line(layers or None, files))
    return lines


def _problems(analysis: Analysis, where: Callable[[str], str | None], required: range,
              router_rows: int) -> list[_Problem]:
    problems = _layer_problems(analysis)
    problems += [_Problem(text, layer) for layer, text in analysis.parsed.problems]
    for block in analysis.blocks.values():
        problems += _block_problems(block, analysis, where, required, router_rows)
    problems += _loose_scale_problems(analysis, where)
    return problems


def _namer(analysis: Analysis) -> Callable[[str], str]:
    """How messages name a piece: by its key part for a per-expert source, else
    canonically."""
    family = analysis.family
    if not analysis.layout.grouped_for(family):
        return lambda piece: family.piece_key(piece).removesuffix(".weight")
    return lambda piece: piece


def _block_problems(block: ExpertBlock, analysis: Analysis, where: Callable[[str], str | None],
                    required: range, router_rows: int) -> list[_Problem]:
    name = _namer(analysis)
    problems = _missing_pieces(block, analysis.family, name, where, required,
                               analysis.parsed.unreadable.get(block.layer, set()))
    if router_rows == 0 and not block.pieces and block.layer not in analysis.parsed.unreadable:
        problems.append(_Problem("the expert tensors hold no experts (0 rows); an MoE layer "
                                 "has at least one", block.layer, _stored_in(block, where)))
    n_experts = analysis.n_experts
    extra = sorted({e for _, e in block.pieces if e >= n_experts})
    if extra:
        limit = (f"{MAX_EXPERTS} experts moekit plans for in a layer"
                 if analysis.count_source == FOUND else
                 f"{n_experts} experts {analysis.count_source}")
        problems.append(_Problem(f"{plural(len(extra), 'expert')} {compress_ranges(extra)} "
                                 f"beyond the {limit}{_weightless(analysis, extra)}",
                                 block.layer))
    groups = _expert_groups(block, analysis.family, n_experts)
    kinds = [_piece_kinds(group) for group in groups]
    for group, found in zip(groups, kinds):
        problems += _shape_problems(group, found, analysis.family, name, where, required)
    problems += _scale_problems(block, kinds[0] if len(groups) == 1 else _piece_kinds(block),
                                name, analysis.fp8_block, required)
    if analysis.family.expert_groups:
        problems += _group_part_problems(block, analysis, router_rows)
    else:
        problems += _router_problems(block, analysis, router_rows)
    return problems


def _expert_groups(block: ExpertBlock, family: Family, n_experts: int) -> list[ExpertBlock]:
    """``block`` as the family's groups of experts (``Family.expert_groups``), numbered one
    group after another, each ``n_experts`` / groups: experts of one group share shapes,
    those of two may not (ERNIE-4.5-VL's text and vision experts)."""
    if not family.expert_groups:
        return [block]
    size = max(1, n_experts // family.n_groups)
    return [ExpertBlock(block.layer, block.block,
                        {k: v for k, v in block.pieces.items() if k[1] // size == group},
                        {k: v for k, v in block.names.items() if k[1] // size == group})
            for group in range(family.n_groups)]


def _group_part_problems(block: ExpertBlock, analysis: Analysis, rows: int) -> list[_Problem]:
    """Each expert group's router and score-correction bias (``ExpertGroup.parts``) must
    fit the group's experts: a router [E, H] ([H, E] where the HF files hold it
    transposed), a bias row [1, E] (every group's rows in one [groups, E] tensor in the HF
    files), E each group's experts."""
    family, layout = analysis.family, analysis.layout
    size = rows // family.n_groups
    hidden = next((part.shape[1] for (piece, _), part in block.pieces.items()
                   if piece in ("gate", "up") and len(part.shape) == 2), None)
    apart = _holds_groups_apart(layout, family)
    problems: dict[str, _Problem] = {}
    for group in family.expert_groups:
        for part in group.parts:
            rule = (1 if apart else family.n_groups, size) if part.row else (size, hidden)
            if part.transposed and not apart:
                rule = tuple(reversed(rule))
            named = f"{group.modules[layout.name]}.{part.name}" if apart else part.hf
            key = layout.from_hf_key(f"{block.block}.{named}", family)
            meta = analysis.tensors.get(key)
            if meta is None or None in rule or tuple(meta.shape) == rule:
                continue
            problems[key] = _Problem(f"{key} is {list(meta.shape)}, expected {list(rule)} "
                                     f"for the {size} experts of each group "
                                     f"{analysis.count_source}", block.layer)
    return list(problems.values())


def _missing_pieces(block: ExpertBlock, family: Family, name: Callable[[str], str],
                    where: Callable[[str], str | None], required: range,
                    unreadable: set[str] = frozenset()) -> list[_Problem]:
    """Required experts that lack pieces, grouped by what they lack (not the
    ``unreadable`` pieces, whose malformed tensors are reported already). Experts wholly
    absent are found as the gaps between present ones, so a count of a billion costs
    nothing."""
    names = _piece_names(block)
    experts = {e for _, e in block.pieces}
    needed = tuple(p for p in family.required_pieces(names) if p not in unreadable)
    present = sorted(e for e in experts if e in required)
    lacking: dict[tuple[str, ...], list[tuple[int, int]]] = defaultdict(list)
    if len(block.pieces) < len(names) * len(experts) or not names.issuperset(needed):
        _add_lacking(block, needed, present, name, lacking)
    gaps = _gaps(required, present)
    if gaps:
        lacking[tuple(name(p) for p in needed)].extend(gaps)
    if not lacking:
        return []
    files = _stored_in(block, where)
    problems = []
    for projs, runs in sorted(lacking.items(), key=lambda item: min(item[1])):
        count = sum(stop - start + 1 for start, stop in runs)
        problems.append(_Problem(f"{plural(count, 'expert')} {compress_runs(runs)} "
                                 f"{'lacks' if count == 1 else 'lack'} {', '.join(projs)}",
                                 block.layer, files, stored=True))
    return problems


def _add_lacking(block: ExpertBlock, needed: tuple[str, ...], present: list[int],
                 name: Callable[[str], str],
                 lacking: dict[tuple[str, ...], list[tuple[int, int]]]) -> None:
    """Add each of the ``present`` experts that lacks some ``needed`` pieces to
    ``lacking``, under the names of what it lacks. Only called where some expert may:
    when every expert holds every piece that one holds, and those include all
    ``needed``, none does."""
    held: dict[int, set[str]] = defaultdict(set)
    for piece, e in block.pieces:
        held[e].add(piece)
    for e in present:
        absent = tuple(name(p) for p in needed if p not in held[e])
        if absent:
            lacking[absent].append((e, e))


def _gaps(required: range, present: list[int]) -> list[tuple[int, int]]:
    """The runs (first, last) of ``required`` (a step-1 range) not in sorted ``present``."""
    runs, start = [], required.start
    for e in present:
        if e > start:
            runs.append((start, e - 1))
        start = e + 1
    if start < required.stop:
        runs.append((start, required.stop - 1))
    return runs


def _stored_in(block: ExpertBlock, where: Callable[[str], str | None]) -> tuple[str, ...]:
    """The files a block's tensors are stored in (none when ``where`` knows none)."""
    return tuple(sorted({f for f in map(where, _source_keys(block)) if f}))


def _piece_kinds(block: ExpertBlock) -> dict[str, dict[tuple, int]]:
    """Piece -> each (shape, dtype) the experts of ``block`` hold it in -> how many do, in
    the order the experts' pieces come: what the shape and scale checks look at each
    expert for only where a piece comes in several kinds."""
    kinds: dict[str, dict[tuple, int]] = defaultdict(dict)
    for (piece, shape, dtype), count in Counter(
            (piece, tuple(x.shape), x.dtype) for (piece, _), x in block.pieces.items()).items():
        kinds[piece][(shape, dtype)] = count
    return kinds


def _shape_problems(block: ExpertBlock, kinds: Mapping[str, dict[tuple, int]], family: Family,
                    name: Callable[[str], str], where: Callable[[str], str | None],
                    required: range) -> list[_Problem]:
    """Required experts whose shape or dtype differs from the other experts' (the majority),
    pieces that hold no elements, and gate, up and down that do not fit together
    (``kinds``: ``_piece_kinds(block)``)."""
    problems = []
    expected: dict[str, tuple] = {}
    for proj in family.all_pieces:
        found = kinds.get(proj)
        if not found:
            continue
        common = max(found, key=found.__getitem__)
        expected[proj] = common
        if 0 in common[0]:
            problems.append(_Problem(f"{name(proj)} is {list(common[0])} {common[1]}: the "
                                     "experts' weights hold no elements", block.layer))
        odd = defaultdict(list)
        if len(found) > 1:
            for (piece, e), x in block.pieces.items():
                got = (tuple(x.shape), x.dtype)
                if piece == proj and got != common and e in required:
                    odd[got].append(e)
        for (shape, dtype), experts in odd.items():
            key = block.names[(proj, experts[0])]
            file = where(key)
            problems.append(_Problem(
                f"{plural(len(experts), 'expert')} {compress_ranges(experts)} {name(proj)} "
                f"{'is' if len(experts) == 1 else 'are'} {list(shape)} {dtype}, the other "
                f"experts {list(common[0])} {common[1]}", block.layer, (file,) if file else ()))
    gate, up, down = (expected.get(p) for p in ("gate", "up", "down"))
    if gate and up and gate[0] != up[0]:
        problems.append(_Problem(f"{name('gate')} {list(gate[0])} and {name('up')} "
                                 f"{list(up[0])} differ in shape", block.layer))
    if up and down and tuple(reversed(up[0])) != down[0]:
        problems.append(_Problem(f"{name('down')} is {list(down[0])}, expected "
                                 f"{list(reversed(up[0]))} (the transpose of {name('up')})",
                                 block.layer))
    return problems


def _fp8_scale_shape(weight: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The shape of the block scales of an [out, in] FP8 weight."""
    return math.ceil(weight[0] / block[0]), math.ceil(weight[1] / block[1])


FP8_SCALE_DTYPES = ("F32", "BF16", "F16", "F64")
"""Dtypes an FP8 block scale may have (DeepSeek-V3 writes F32, some releases BF16): a scale
in a float8 or integer dtype is a damaged or mislabelled tensor, not a format."""


def _scale_problems(block: ExpertBlock, kinds: Mapping[str, dict[tuple, int]],
                    name: Callable[[str], str], block_size: tuple[int, int],
                    required: range) -> list[_Problem]:
    """Expert quantisation pieces that do not fit their weight: FP8 scales whose shape is
    not [ceil(out/rows), ceil(in/columns)] or whose dtype is not a float of 16 bits or more
    (a scale that does not cover its weight dequantises to wrong values), and MXFP4 blocks
    and scales that are not bytes shaped [out, G, 16] and [out, G] (``kinds``:
    ``_piece_kinds(block)``)."""
    if not any(piece.endswith((SCALE, MX_BLOCKS)) for piece in kinds):
        return []
    if _scales_fit(block, kinds, block_size):
        return []
    wrong: dict[str, list[int]] = defaultdict(list)
    for (piece, e), part in block.pieces.items():
        if e not in required:
            continue
        if piece.endswith(SCALE):
            weight = block.pieces.get((piece[:-len(SCALE)], e))
            text = _fp8_scale_problem(tuple(part.shape), part.dtype,
                                      None if weight is None else tuple(weight.shape), block_size)
        elif piece.endswith(MX_BLOCKS):
            scales = block.pieces.get((piece[:-len(MX_BLOCKS)] + MX_SCALES, e))
            text = _mxfp4_problem(part, scales, name(piece[:-len(MX_BLOCKS)] + MX_SCALES))
        else:
            continue
        if text:
            wrong[f"{name(piece)} {{verb}} {text}"].append(e)
    return [_Problem(f"{plural(len(experts), 'expert')} {compress_ranges(experts)} "
                     + text.format(verb="is" if len(experts) == 1 else "are"), block.layer)
            for text, experts in wrong.items()]


def _scales_fit(block: ExpertBlock, kinds: Mapping[str, dict[tuple, int]],
                block_size: tuple[int, int]) -> bool:
    """True when every FP8 scale of ``block`` fits its weight, told without looking at
    each expert: no MXFP4 pieces, every expert holds every piece, and each scale and its
    weight come in one shape and dtype (``kinds``), which fit. False where any of that is
    not so: each expert is then looked at."""
    if any(piece.endswith(MX_BLOCKS) for piece in kinds):
        return False
    if len(block.pieces) != len(kinds) * len({e for _, e in block.pieces}):
        return False
    for piece, found in kinds.items():
        if not piece.endswith(SCALE):
            continue
        weight = kinds.get(piece[:-len(SCALE)], {})
        if len(found) != 1 or len(weight) != 1:
            return False
        [(shape, dtype)], [(weight_shape, _)] = found, weight
        if _fp8_scale_problem(shape, dtype, weight_shape, block_size):
            return False
    return True


@lru_cache(maxsize=1024)
def _fp8_scale_problem(shape: tuple[int, ...], dtype: str, weight: tuple[int, ...] | None,
                       block_size: tuple[int, int]) -> str | None:
    """What is wrong with an FP8 block scale of this shape and dtype beside a weight of
    shape ``weight`` (None: no weight). Cached: every expert of a checkpoint asks the
    same few questions."""
    if dtype not in FP8_SCALE_DTYPES:
        return (f"{dtype}; FP8 block scales are floats of 16 bits or more "
                f"({', '.join(FP8_SCALE_DTYPES)})")
    if weight is None or len(weight) != 2:
        return None
    expected = _fp8_scale_shape(weight, block_size)
    if shape != expected:
        return (f"{list(shape)}; the block scales of a {list(weight)} weight are "
                f"{list(expected)} ({_block_rule(block_size)})")
    return None


def _mxfp4_problem(blocks: Expr, scales: Expr | None, scales_name: str) -> str | None:
    """What is wrong with MXFP4 ``blocks`` [out, G, 16] and their ``scales`` [out, G]."""
    dtypes = {blocks.dtype} | ({scales.dtype} if scales is not None else set())
    if dtypes != {MXFP4_DTYPE}:
        shown = f"{blocks.dtype}" + (f" with {scales_name} {scales.dtype}" if scales else "")
        return f"{shown}; MXFP4 blocks and scales are bytes ({MXFP4_DTYPE})"
    shape = tuple(blocks.shape)
    if len(shape) != 3 or shape[2] != MXFP4_PAIRS:
        return f"{list(shape)}; MXFP4 blocks are [out, in/32, {MXFP4_PAIRS}]"
    if scales is not None and tuple(scales.shape) != shape[:2]:
        return (f"{list(shape)} with {scales_name} {list(scales.shape)}; the scales of these "
                f"blocks are {list(shape[:2])}")
    return None


def _block_rule(block_size: tuple[int, int]) -> str:
    return f"ceil(out/{block_size[0]}) x ceil(in/{block_size[1]})"


def _loose_scale_problems(analysis: Analysis, where: Callable[[str], str | None]
                          ) -> list[_Problem]:
    """The same check for FP8 scales outside the experts (attention, dense MLP, ...)."""
    problems = []
    for key, scale in analysis.tensors.items():
        if not key.endswith(FP8_SCALE_KEY) or key in analysis.parsed.claimed:
            continue
        weight = analysis.tensors.get(key[:-len(FP8_SCALE_KEY)])
        if weight is None or not weight.dtype.startswith("F8"):
            continue
        text = _fp8_scale_problem(tuple(scale.shape), scale.dtype, tuple(weight.shape),
                                  analysis.fp8_block)
        if text:
            file = where(key)
            problems.append(_Problem(f"{key} is {text}", files=(file,) if file else ()))
    return problems


def _weightless(analysis: Analysis, extra: list[int]) -> str:
    """What to say of experts beyond the count that the router scores but that hold no
    weights (LongCat-Flash's zero-computation experts): why their tensors are refused."""
    settings = analysis.settings
    if settings is None or settings.router_extra is None or not settings.router_extra[0]:
        return ""
    count, key = settings.router_extra
    if extra[-1] >= analysis.n_experts + count:
        return ""
    return (f"; the router's {count} rows after the routed experts' ({key} {count}) are "
            f"for experts without weights, which the {analysis.family.name} model never reads "
            "(transformers 5.24 saves unused gate and up rows for LongCat-Flash's): remove "
            "those tensors")


def _router_problems(block: ExpertBlock, analysis: Analysis, rows: int) -> list[_Problem]:
    """The router must have a row per expert (and a column per hidden feature), and more
    where the family's router scores weightless experts too (``Settings.router_extra``);
    its bias and score-correction bias an entry per expert. A whole checkpoint of a known
    family must hold the router: a model loaded without it would route by random weights
    (transformers only warns of a weight missing)."""
    family, layout = analysis.family, analysis.layout
    if family.router is None:
        return []
    required = analysis.whole_model and bool(family.model_types)
    router = f"{block.block}.{family.router}"
    base = router.removesuffix("weight")
    hidden = next((part.shape[1] for (piece, _), part in block.pieces.items()
                   if piece in ("gate", "up") and len(part.shape) == 2), None)
    extra = analysis.settings.router_extra if analysis.settings else None
    weight_rows = rows + (extra[0] if extra else 0)
    checks = [(router, (weight_rows, hidden) if hidden else None)]
    checks += [(base + suffix, (rows,)) for suffix in ("bias", "e_score_correction_bias")]
    problems = []
    for hf_key, expected in checks:
        key = layout.from_hf_key(hf_key, family)
        meta = analysis.tensors.get(key)
        if meta is None:
            if hf_key == router and required:
                problems.append(_Problem(f"the router {key} is missing", block.layer))
            continue
        shape = tuple(meta.shape)
        if expected is None:
            bad = len(shape) != 2 or shape[0] != weight_rows
            expected_text = f"[{weight_rows}, H]"
        else:
            bad = shape != expected
            expected_text = str(list(expected))
        if bad:
            more = f" and {extra[1]} {extra[0]}" if extra and hf_key == router else ""
            problems.append(_Problem(f"router {key} is {list(shape)}, expected {expected_text} "
                                     f"for the {rows} experts {analysis.count_source}{more}",
                                     block.layer))
    return problems


def _layer_problems(analysis: Analysis) -> list[_Problem]:
    """MoE layers against the config: none beyond its decoder layers and, in a whole
    checkpoint, experts in exactly the layers its family's rule makes MoE layers."""
    settings = analysis.settings
    rule = settings.moe_layers if settings else None
    if rule is None:
        return []
    found = sorted(analysis.blocks)
    problems = []
    beyond = [layer for layer in found if layer >= rule.count and layer not in rule.extra]
    if beyond:
        problems.append(_Problem(
            f"{_layers(beyond)} {'holds' if len(beyond) == 1 else 'hold'} experts, but "
            f"{settings.source} gives the model {rule.count} decoder layers ({rule.rule})"))
    if not analysis.whole_model:
        return problems
    dense = [layer for layer in found if layer < rule.count and not rule.is_moe(layer)]
    if dense:
        problems.append(_Problem(
            f"{_layers(dense)} {'holds' if len(dense) == 1 else 'hold'} experts, but "
            f"{settings.source} makes {'it a dense layer' if len(dense) == 1 else 'them dense'}"
            f" ({rule.rule})"))
    if analysis.n_experts:
        present = set(found)
        total = rule.size - sum(1 for layer in present if layer < rule.count and rule.is_moe(layer))
        missing = list(islice((layer for layer in rule.expected() if layer not in present),
                              SHOWN_LAYERS))
        if missing:
            more = f" and {total - len(missing)} more" if total > len(missing) else ""
            problems.append(_Problem(
                f"{_layers(missing)}{more} {'holds' if total == 1 else 'hold'} no expert "
                f"tensors, but {settings.source} makes "
                f"{'it an MoE layer' if total == 1 else 'them MoE layers'} ({rule.rule})"))
    return problems


def _layers(layers: list[int]) -> str:
    return f"{plural(len(layers), 'layer')} {compress_ranges(layers)}"
