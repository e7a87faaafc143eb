"""Loading on an expert-parallel rank: only this rank's experts are read."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..checkpoint import Checkpoint
from ..executors.device import read_plan
from ..executors.memory import checked_device
from ..gc_pauses import without_gc_pauses
from ..planner import understand_checkpoint
from .dtensors import ep_coordinates, shard_experts
from .ranges import rank_plan


@without_gc_pauses
def load_experts(path: str | Path, device_mesh: DeviceMesh, layout: str = "nemo",
                 device: torch.device | str | None = None, from_: str | None = None,
                 config: str | Path | None = None) -> dict[str, torch.Tensor]:
    """This rank's state dict: grouped expert tensors of ``layout`` as DTensors
    (``Shard(0)`` on the mesh's "ep" dimension, replicated on the others, global shape
    exact also for uneven splits), every other tensor as a plain tensor. ``path`` is a
    safetensors checkpoint or a torch.distributed.checkpoint folder in any layout, its
    tensors saved whole (``convert --format dcp``) or as ranks' row chunks
    (``save_experts(format="dcp")``); on the CPU, either way, only this rank's rows are
    read, through moekit's reader, which converts between layouts and never unpickles
    more of ``.metadata`` than DCP's own classes.

    The rank checks, before reading anything, that every expert of its range is present
    and well-shaped (the error names the rank, layers, experts and projections), then
    reads only its own experts' bytes plus the non-expert tensors. No collective is
    called, so a rank that fails does not leave the others waiting. With an accelerator
    ``device`` (e.g. "cuda"), bytes go through a small pool of pinned buffers straight to
    the device, where the grouped tensors are built. ``config`` names the model's
    config.json where the checkpoint has none (``Checkpoint.open``).
    """
    checked_device(device)
    size, rank = ep_coordinates(device_mesh)
    checkpoint = Checkpoint.open(path, config)
    analysis = understand_checkpoint(checkpoint, from_)
    plan = rank_plan(analysis, size, rank, layout, checkpoint.file_of)
    return read_plan(plan, checkpoint, device,
                     lambda local: shard_experts(local, device_mesh, analysis.n_experts))
