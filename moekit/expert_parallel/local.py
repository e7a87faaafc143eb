"""A rank's grouped expert DTensors -> its experts under global HF per-expert keys."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..conversion import state_dict_meta
from ..errors import MoekitError
from ..executors.memory import checked_state_dict
from ..layouts import HF
from ..plan import Plan
from ..planner import build_plan, understand, validate
from .dtensors import ep_coordinates, is_expert_shard
from .ranges import expert_range, grouped_layout


def local_hf_plan(state_dict: Mapping[str, torch.Tensor], mesh: DeviceMesh, layout: str,
                  family: str | None = None, config: dict | None = None
                  ) -> tuple[dict[str, torch.Tensor], int, Plan]:
    """(plain local tensors, global expert count, plan of this rank's HF tensors).

    The plan names this rank's experts by their global index; non-expert tensors are in
    it too (the caller decides which rank writes them).
    """
    grouped_layout(layout)
    size, rank = ep_coordinates(mesh)
    local, n_experts, n_local = _local_tensors(checked_state_dict(state_dict), mesh)
    mine = expert_range(n_experts, size, rank)
    if n_local != len(mine):
        raise MoekitError(f"EP rank {rank} holds {n_local} experts; the rule gives it "
                          f"{len(mine)} of {n_experts}")
    analysis = understand(state_dict_meta(local), config, {}, f"EP rank {rank} state dict",
                          from_=layout, family=family, n_experts=n_local)
    validate(analysis, total_experts=n_experts)
    return local, n_experts, build_plan(analysis, HF, offset=mine.start)


def _local_tensors(state_dict: Mapping[str, torch.Tensor], mesh: DeviceMesh
                   ) -> tuple[dict[str, torch.Tensor], int, int]:
    """Plain local tensors, the global expert count and the local one."""
    local: dict[str, torch.Tensor] = {}
    counts = set()
    for key, value in state_dict.items():
        if isinstance(value, DTensor) and value.device_mesh != mesh:
            raise MoekitError(f"{key} is a DTensor on the mesh {value.device_mesh}, not on the "
                              f"mesh given ({mesh}): save_experts saves what load_experts "
                              "gives (save what load_sharded gives with save_sharded)")
        local[key] = value.to_local() if isinstance(value, DTensor) else value
        if is_expert_shard(value, mesh):
            counts.add((value.shape[0], local[key].shape[0]))
    if len(counts) != 1:
        raise MoekitError("expected grouped expert DTensors sharded Shard(0) over the EP mesh "
                          f"dimension, all with one expert count; found {sorted(counts) or 'none'}")
    (n_experts, n_local), = counts
    return local, n_experts, n_local
