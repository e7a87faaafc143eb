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
from ..layouts import LAYOUTS, NEMO, Layout, layout_named
from ..plan import Plan
from ..planner import Analysis, build_plan, validate


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
    its local tensors."""
    dst = grouped_layout(layout)
    mine = expert_range(analysis.n_experts, size, rank, placement)
    try:
        validate(analysis, required=mine, where=where)
    except PlanError as err:
        raise PlanError(f"EP rank {rank} of {size} (experts {_span(mine)}): {err.headline}",
                        err.problems) from None
    return build_plan(analysis, dst, experts=mine)


def grouped_layout(name: str) -> Layout:
    """The layout called ``name``, once it is grouped: expert parallelism shares the rows of
    grouped tensors out among the ranks, and a per-expert layout has none."""
    layout = layout_named(name)
    if not layout.grouped:
        raise MoekitError(f"expert parallelism shards grouped expert tensors by rows; the "
                          f"{layout.name} layout keeps one tensor per expert: choose "
                          f"{', '.join(EP_LAYOUTS)}")
    return layout


def _span(experts: range) -> str:
    return f"{experts.start}-{experts.stop - 1}" if experts else "none"
