"""Which experts a rank owns, and the plan of what it loads (torch-free: ``moekit plan``
answers from headers without importing torch).

Two placements of E experts on n ranks, both contiguous:

- ``chunk`` (the default) is the rule of ``torch.chunk`` and of DTensor's ``Shard(0)``:
  every rank but the last ones gets ``ceil(E / n)`` experts, the last ranks may get fewer
  (E=10 on 4 ranks: 3, 3, 3, 1; E=5 on 4 ranks: 2, 2, 1, 0). Using DTensor's own rule is
  what makes ``full_tensor()``, redistribution and DCP agree with the rows every rank
  holds, so loading, saving and DTensor metadata all use it.
- ``vllm`` is vLLM's default expert placement (``determine_expert_map``, "linear", vLLM
  0.33), which NeMo AutoModel shares: the first ``E mod n`` ranks get one expert more than
  the others (3, 3, 2, 2). A rank's plan in this placement gives the tensors that rank of
  a running vLLM engine holds, e.g. to copy weights into it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import MoekitError, PlanError
from ..layouts import LAYOUTS, NEMO, Family, Layout, layout_named
from ..plan import Plan
from ..planner import (Analysis, build_plan, converted_refusal, held_refusal, lost_pieces,
                       trying_layouts, validate)


def chunk(length: int, parts: int, index: int) -> slice:
    """``torch.chunk``'s rule (DTensor's ``Shard(0)`` and FSDP2's): ``ceil(length / parts)``
    rows a part, the last parts fewer or none."""
    per_part = math.ceil(length / parts) if length else 0
    return slice(min(index * per_part, length), min((index + 1) * per_part, length))


def _chunk(n_experts: int, ep_size: int, ep_rank: int) -> range:
    """``torch.chunk``'s rule: ``ceil(E / n)`` experts a rank, the last ranks fewer or none."""
    return range(n_experts)[chunk(n_experts, ep_size, ep_rank)]


def _vllm(n_experts: int, ep_size: int, ep_rank: int) -> range:
    """vLLM's linear expert map: the first ``E mod n`` ranks get one expert more."""
    base, extra = divmod(n_experts, ep_size)
    start = ep_rank * base + min(ep_rank, extra)
    return range(start, start + base + (ep_rank < extra))


PLACEMENTS: dict[str, Callable[[int, int, int], range]] = {"chunk": _chunk, "vllm": _vllm}
"""How experts are placed on expert-parallel ranks (see the module docstring): name ->
the experts of (E, n, rank)."""


EP_LAYOUTS: tuple[str, ...] = (NEMO.name, *(name for name, layout in LAYOUTS.items()
                                            if layout.grouped and layout is not NEMO))
"""The layouts expert parallelism loads (grouped: it shares their rows out among the
ranks), in the order ``moekit plan`` tries them for its default: NeMo AutoModel's, whose
training loads them sharded, then the others."""


def expert_range(n_experts: int, ep_size: int, ep_rank: int, placement: str = "chunk") -> range:
    """The contiguous experts rank ``ep_rank`` of ``ep_size`` owns in ``placement``:
    ``chunk`` (``torch.chunk``, DTensor ``Shard(0)``) or ``vllm`` (the first ``E mod n``
    ranks get one expert more)."""
    for name, value in (("n_experts", n_experts), ("ep_size", ep_size), ("ep_rank", ep_rank)):
        if type(value) is not int:
            raise MoekitError(f"{name} is {value!r}; expected a whole number")
    if not isinstance(placement, str) or placement not in PLACEMENTS:
        raise MoekitError(f"unknown expert placement {placement!r}; known placements: "
                          f"{', '.join(PLACEMENTS)}")
    if not 0 < ep_size <= n_experts:
        raise MoekitError(f"cannot split {n_experts} experts over {ep_size} expert-parallel "
                          "ranks: an EP group has at least one rank and at most one rank per "
                          "expert (1 <= ep_size <= n_experts)")
    if not 0 <= ep_rank < ep_size:
        raise MoekitError(f"rank {ep_rank} is not in an EP group of {ep_size}")
    return PLACEMENTS[placement](n_experts, ep_size, ep_rank)


def rank_plan(analysis: Analysis, size: int, rank: int, layout: str,
              where: Callable[[str], str | None] = lambda key: None,
              placement: str = "chunk") -> Plan:
    """Validate the experts EP rank ``rank`` of ``size`` needs in ``placement`` and plan
    its local tensors; a layout refused names the ``layout=`` values that plan
    (``planned``)."""
    dst = grouped_layout(layout, analysis)
    mine = expert_range(analysis.n_experts, size, rank, placement)
    try:
        validate(analysis, required=mine, where=where)
    except PlanError as err:
        raise PlanError(f"EP rank {rank} of {size} (experts {_span(mine)}): {err.headline}",
                        err.problems) from None
    return planned(analysis, dst, lambda can: _arguments(can, analysis.family), mine)


def planned(analysis: Analysis, dst: Layout, instead: Callable[[list[str]], str],
            experts: range = range(1)) -> Plan:
    """The plan of ``experts`` of every MoE block in ``dst``, refused where ``dst`` has no
    place for some of the experts' pieces (FP8 scales in nemo), is refused for the family
    (``Family.unconverted``) or the planner refuses it (transformers' joined FP8 scale
    grid over experts whose size is not a whole number of blocks), naming what to do
    instead: ``instead`` of the layouts of ``EP_LAYOUTS`` in which the checkpoint plans
    (``_planning``). The planner's own remedies are convert's (``--dequantize``, the hf
    layout), which expert parallelism has not: its refusals of pieces and families
    (``_held_refusal``) are said without them, the others followed by what to do."""
    try:
        return build_plan(analysis, dst, experts=experts)
    except PlanError:
        raise
    except MoekitError as err:
        refusal, can = _held_refusal(analysis, dst), _planning(analysis, dst)
        if refusal:
            raise MoekitError(f"{refusal}: {instead(can)}") from None
        if not can:
            raise
        raise MoekitError(f"{err}\nfor expert parallelism: {instead(can)}") from None


def _held_refusal(analysis: Analysis, dst: Layout) -> str:
    """Why ``dst`` cannot hold the checkpoint's experts as they are: pieces it has no place
    for, or a family it is refused for; empty where neither. Expert parallelism has no
    ``--dequantize`` to offer, as convert has, nor per-expert layouts."""
    family = analysis.family
    return (held_refusal(lost_pieces(analysis.blocks, family, dst), family, dst)
            or converted_refusal(family, dst))


def plan_if_held(analysis: Analysis, dst: Layout) -> Plan | None:
    """The plan of one expert a layer in ``dst``; None where ``dst`` is refused
    (``_held_refusal``) or the planner refuses it (offering nothing: ``trying_layouts``)."""
    if _held_refusal(analysis, dst):
        return None
    try:
        with trying_layouts():
            return build_plan(analysis, dst, experts=range(1))
    except MoekitError:
        return None


def _planning(analysis: Analysis, dst: Layout) -> list[str]:
    """The layouts of ``EP_LAYOUTS`` but ``dst`` in which the checkpoint plans, each tried:
    one that holds the experts' pieces may still be refused by the planner."""
    return [name for name in EP_LAYOUTS
            if name != dst.name and plan_if_held(analysis, LAYOUTS[name]) is not None]


def _arguments(can: list[str], family: Family) -> str:
    """What to load instead: the ``layout=`` values ``can`` of ``load_experts``,
    ``load_sharded`` and ``rank_plan``."""
    return (f"pass {' or '.join(f'layout={name!r}' for name in can)}" if can
            else f"expert parallelism loads no other layout that holds the {family.name} "
                 "experts")


def grouped_layout(name: str, analysis: Analysis | None = None) -> Layout:
    """The layout called ``name``, once it is grouped: expert parallelism shares the rows of
    grouped tensors out among the ranks, and a per-expert layout has none. A per-expert
    one is refused naming ``EP_LAYOUTS``, or with ``analysis``, those in which its
    checkpoint plans (``_planning``)."""
    layout = layout_named(name)
    if not layout.grouped:
        can = EP_LAYOUTS if analysis is None else _planning(analysis, layout)
        raise MoekitError(f"expert parallelism shards grouped expert tensors by rows; the "
                          f"{layout.name} layout keeps one tensor per expert: "
                          + (f"choose {', '.join(can)}" if can else
                             "no grouped layout holds the checkpoint's experts"))
    return layout


def _span(experts: range) -> str:
    return f"{experts.start}-{experts.stop - 1}" if experts else "none"
