"""A tiny transformers Qwen3-MoE run with FSDP2 over "dp" and its experts split over "ep",
on the state ``moekit.load_sharded`` gives: the check that a sharded load feeds a
sharded model.

transformers' MoE module holds every expert and takes no DTensors, so each rank keeps
only its own rows of the grouped expert tensors (the ``Shard(0)`` local tensors of the
load), computes the tokens routed to them, and an all-reduce over the EP group sums the
ranks' outputs. Routing picks an expert by its global index; a rank routes the choices of
experts it does not hold to its first expert with a weight of zero, which adds exactly
nothing to the output (transformers' eager experts of every release take that; an index
past the local experts is skipped by some releases and out of bounds in others).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from moekit import load_sharded, samples

VOCAB = 96


def save_tiny_model(path: Path, experts: int) -> None:
    """A seeded tiny Qwen3-MoE of ``experts`` experts, saved with ``save_pretrained``."""
    samples.build_model("qwen3_moe", num_experts=experts, vocab_size=VOCAB).save_pretrained(path)


def _model(path: Path, device: torch.device, seed: int) -> nn.Module:
    """The architecture of ``path``'s config, drawn with ``seed``, on ``device``, with
    transformers' eager experts (the ones that skip the "no expert" index)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config._experts_implementation = "eager"
    return samples.from_config(config, seed).to(device)


def reference_logits(path: Path, device: torch.device) -> torch.Tensor:
    """The whole model's logits on one device, loaded with transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        return model(samples.sample_input(VOCAB).to(device)).logits


class LocalExperts(nn.Module):
    """The experts module of one EP rank: its own experts, from global index ``start``."""

    def __init__(self, inner: nn.Module, gate_up: torch.Tensor, down: torch.Tensor,
                 start: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        inner.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        inner.down_proj = nn.Parameter(down, requires_grad=False)
        inner.num_experts = gate_up.shape[0]
        self.inner, self.start, self.group = inner, start, group

    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
        local = index - self.start
        held = (local >= 0) & (local < self.inner.num_experts)
        out = self.inner(hidden, torch.where(held, local, torch.zeros_like(local)),
                         torch.where(held, weights, torch.zeros_like(weights)))
        dist.all_reduce(out, group=self.group)
        return out


def _first_expert(rows: int, mesh: DeviceMesh) -> int:
    """Global index of this EP rank's first expert (the sum of the lower ranks' rows)."""
    group = mesh.get_group("ep")
    counts: list[int] = [0] * dist.get_world_size(group)
    dist.all_gather_object(counts, rows, group=group)
    return sum(counts[:mesh.get_local_rank("ep")])


def ep_forward_logits(path: Path, mesh: DeviceMesh, device: torch.device) -> torch.Tensor:
    """Logits of the model at ``path`` loaded with ``load_sharded`` on ``mesh``: FSDP2
    over "dp" for every tensor but the experts, the experts split over "ep"."""
    state = load_sharded(path, mesh, layout="transformers")
    model = _model(path, device, seed=1)
    experts = [set(layer.mlp.experts.parameters()) for layer in model.model.layers]
    for layer, ignored in zip(model.model.layers, experts):
        fully_shard(layer, mesh=mesh["dp"], ignored_params=ignored)
    fully_shard(model, mesh=mesh["dp"], ignored_params=set().union(*experts))
    whole = {k: v.full_tensor() if ".experts." in k else v for k, v in state.items()}
    set_model_state_dict(model, whole, options=StateDictOptions(strict=True))
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp.experts."
        gate_up, down = (state[prefix + name] for name in ("gate_up_proj", "down_proj"))
        assert isinstance(gate_up, DTensor) and isinstance(down, DTensor)
        start = _first_expert(gate_up.to_local().shape[0], mesh)
        layer.mlp.experts = LocalExperts(layer.mlp.experts, gate_up.to_local(),
                                         down.to_local(), start, mesh.get_group("ep"))
    with torch.no_grad():
        return model(samples.sample_input(VOCAB).to(device)).logits
