"""The in-memory adapter a training framework plugs in between HF state dicts and its
grouped-expert modules (the role of NeMo AutoModel's ``MoESplitExpertsStateDictMixin``).

It keeps no state between calls: every call reads the keys it is given, validates all
experts at once and returns a new dict. Non-expert tensors are passed through as the
same tensor objects.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from .conversion import convert_state_dict, state_dict_meta
from .errors import MoekitError
from .executors.memory import checked_state_dict, run_on_state_dict
from .expert_parallel.local import local_hf_plan
from .expert_parallel.dtensors import ep_coordinates, shard_experts
from .expert_parallel.ranges import rank_plan
from .layouts import HF, layout_named
from .planner import FOUND, analyse, checked_expert_count, family_called, understand


class ExpertAdapter:
    """Converts state dicts between the HF layout (what ``save_pretrained`` writes: per
    expert for most families, grouped for those whose files group them) and one grouped
    layout.

    ``family`` is a moekit family name (``qwen3_moe``, ``mixtral``, ...) or None to
    recognise the naming from the keys; ``n_experts`` (or ``config``, a config.json dict)
    says how many experts every MoE layer must hold, so that a missing one is an error
    rather than a smaller tensor. Each argument is checked here, so that a wrong one is
    named before the first state dict arrives.
    """

    def __init__(self, layout: str = "nemo", family: str | None = None,
                 n_experts: int | None = None, config: dict | None = None) -> None:
        layout_named(layout)
        if family is not None:
            family_called(family)
        if n_experts is not None:
            checked_expert_count(n_experts)
        if config is not None and not isinstance(config, Mapping):
            raise MoekitError(f"config is a {type(config).__name__}; expected a dict of "
                              "config.json settings")
        self.layout = layout
        self.family = family
        self.n_experts = n_experts
        self.config = config

    def from_hf(self, state_dict: Mapping[str, torch.Tensor],
                device_mesh: DeviceMesh | None = None) -> dict[str, torch.Tensor]:
        """HF keys -> this adapter's grouped layout.

        With a ``device_mesh``, only this rank's experts are used (the others may be
        absent from ``state_dict``, so the adapter must know the expert count from
        ``n_experts`` or ``config``) and the grouped tensors are DTensors sharded over the
        mesh's "ep" dimension, as ``moekit.load_experts`` returns them.
        """
        if device_mesh is None:
            return self._convert(state_dict, HF.name, self.layout)
        if not isinstance(device_mesh, DeviceMesh):
            raise MoekitError(f"device_mesh is a {type(device_mesh).__name__}; expected a "
                              "torch.distributed DeviceMesh (or None)")
        analysis = understand(state_dict_meta(state_dict), self.config, {}, "state dict",
                              from_=HF.name, family=self.family, n_experts=self.n_experts)
        if analysis.count_source == FOUND:
            raise MoekitError("from_hf with a device_mesh needs the number of experts "
                              "(ExpertAdapter(n_experts=...) or config=): a rank's state dict "
                              "may hold only its own experts, so their count cannot be read "
                              "from its keys")
        plan = rank_plan(analysis, *ep_coordinates(device_mesh), self.layout)
        return run_on_state_dict(plan, state_dict, lambda local: shard_experts(
            local, device_mesh, analysis.n_experts))

    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This adapter's grouped layout -> HF keys.

        Grouped DTensors give this rank's experts under their global indices; the
        non-expert tensors are returned on every rank.
        """
        checked_state_dict(state_dict)
        mesh = next((t.device_mesh for t in state_dict.values() if isinstance(t, DTensor)), None)
        if mesh is None:
            return self._convert(state_dict, self.layout, HF.name)
        local, _, plan = local_hf_plan(state_dict, mesh, self.layout, self.family, self.config)
        return run_on_state_dict(plan, local)

    def validate(self, state_dict: Mapping[str, torch.Tensor], layout: str = HF.name) -> None:
        """Raise PlanError naming every missing or malformed expert of ``state_dict``."""
        analyse(state_dict_meta(state_dict), self.config, {}, "state dict", from_=layout,
                family=self.family, n_experts=self.n_experts)

    def _convert(self, state_dict: Mapping[str, torch.Tensor], src: str, dst: str
                 ) -> dict[str, torch.Tensor]:
        return convert_state_dict(state_dict, src, dst, family=self.family,
                                  n_experts=self.n_experts, config=self.config)
