"""The in-memory adapter a training framework plugs in between HF state dicts and its
grouped-expert modules (the role of NeMo AutoModel's ``MoESplitExpertsStateDictMixin``).

It keeps no state between calls: every call reads the keys it is given, validates all
experts at once and returns a new dict. Non-expert tensors are passed through as the
same tensor objects.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .convert import convert_state_dict, state_dict_meta
from .planner import analyse


class ExpertAdapter:
    """Converts state dicts between the HF per-expert layout and one grouped layout.

    ``family`` is a moekit family name (``qwen3_moe``, ``mixtral``, ...) or None to
    recognise the naming from the keys; ``n_experts`` (or ``config``, a config.json dict)
    says how many experts every MoE layer must hold, so that a missing one is an error
    rather than a smaller tensor.
    """

    def __init__(self, layout: str = "nemo", family: str | None = None,
                 n_experts: int | None = None, config: dict | None = None) -> None:
        self.layout = layout
        self.family = family
        self.n_experts = n_experts
        self.config = config

    def from_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF per-expert keys -> this adapter's grouped layout."""
        return self._convert(state_dict, "hf", self.layout)

    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This adapter's grouped layout -> HF per-expert keys."""
        return self._convert(state_dict, self.layout, "hf")

    def validate(self, state_dict: Mapping[str, torch.Tensor], layout: str = "hf") -> None:
        """Raise PlanError naming every missing or malformed expert of ``state_dict``."""
        analyse(state_dict_meta(state_dict), self.config, {}, "state dict", from_=layout,
                family=self.family, n_experts=self.n_experts)

    def _convert(self, state_dict: Mapping[str, torch.Tensor], src: str, dst: str
                 ) -> dict[str, torch.Tensor]:
        return convert_state_dict(state_dict, src, dst, family=self.family,
                                  n_experts=self.n_experts, config=self.config)
