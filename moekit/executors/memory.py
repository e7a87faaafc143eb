"""The in-memory executor: plan -> dict of tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..plan import Plan
from ..sources import TensorSource
from .evaluate import materialize


def run_plan(plan: Plan, source: TensorSource, device: torch.device | str | None = None,
             wrap_experts: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor]:
    """Every tensor of ``plan``; ``wrap_experts`` is applied to the routed-expert ones
    (e.g. to make them DTensors). Unchanged tensors are returned as the source gives them
    when they already lie on ``device``."""
    out: dict[str, torch.Tensor] = {}
    for tensor in plan.tensors:
        value = materialize(tensor.recipe, source, device)
        if wrap_experts is not None and tensor.name in plan.expert_tensors:
            value = wrap_experts(value)
        out[tensor.name] = value
    return out
