"""Saving from expert-parallel ranks back to a Hugging Face per-expert checkpoint.

Each rank that holds a distinct set of experts (EP coordinate r, coordinate 0 on every
other mesh dimension) writes its experts to ``model-{r+1}-of-{n}.safetensors`` under their
global HF keys; EP rank 0 also writes every non-expert tensor, the index and the
non-weight files. torch.distributed is used only to agree on the temporary folder and on
success: on any rank's failure the temporary folder is removed everywhere and nothing is
put in place.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..checkpoint import FAMILY_METADATA_KEY, LAYOUT_METADATA_KEY, Checkpoint, read_config
from ..errors import MoekitError
from ..executors.streaming import write_index, write_shard
from ..output import check_destination, replace_folder, temporary_folder
from ..plan import TensorPlan
from ..sources import DictSource
from .local import local_hf_plan
from .dtensors import ep_coordinates, ep_dim
from .ranges import expert_range


def save_experts(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                 device_mesh: DeviceMesh, layout: str = "nemo", family: str | None = None,
                 config_from: str | Path | None = None, overwrite: bool = False) -> None:
    """Write the state dict that ``load_experts`` returned (same keys, grouped experts as
    DTensors) back to an HF per-expert checkpoint at ``path``. Call it on every rank.

    ``config_from`` is a checkpoint folder whose non-weight files (config.json, tokenizer,
    ...) are copied beside the weights; its config also names the model family.
    """
    size, rank = ep_coordinates(device_mesh)
    config = read_config(Path(config_from)) if config_from else None
    local, n_experts, plan = local_hf_plan(state_dict, device_mesh, layout, family, config)
    writes = [t for t in plan.tensors if rank == 0 or t.name in plan.expert_tensors]
    writer = all(device_mesh.get_local_rank(d) == 0 for d in range(device_mesh.ndim)
                 if d != ep_dim(device_mesh))
    files = sum(1 for r in range(size) if r == 0 or expert_range(n_experts, size, r))
    metadata = {"format": "pt", LAYOUT_METADATA_KEY: "hf", FAMILY_METADATA_KEY: plan.family}
    _coordinated_write(Path(path), overwrite, writer and bool(writes), rank, files,
                       writes, DictSource(local), metadata, config_from)


def _coordinated_write(path: Path, overwrite: bool, writes_file: bool, rank: int, files: int,
                       tensors: list[TensorPlan], source: DictSource,
                       metadata: dict[str, str], config_from: str | Path | None) -> None:
    """Rank 0 makes the temporary folder; writers fill it; rank 0 puts it in place."""
    folder = _agree_on_folder(path, overwrite)
    name = f"model-{rank + 1:05d}-of-{files:05d}.safetensors"
    error = None
    try:
        if writes_file:
            write_shard(folder / name, tensors, source, metadata)
    except Exception as err:  # reported to every rank below
        error = f"rank {dist.get_rank()}: {err}"
    outcomes: list = [None] * dist.get_world_size()
    mapping = {t.name: name for t in tensors} if writes_file else {}
    dist.all_gather_object(outcomes, (error, mapping, tensors if writes_file else []))
    errors = [e for e, _, _ in outcomes if e]
    if rank == 0 and dist.get_rank() == 0:
        if errors:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            _finish(folder, path, outcomes, config_from)
    dist.barrier()
    if errors:
        raise MoekitError("save_experts failed, nothing was written: " + "; ".join(errors))


def _agree_on_folder(path: Path, overwrite: bool) -> Path:
    """Rank 0 checks the destination and makes the temporary folder; all ranks learn it."""
    message: list = [None]
    if dist.get_rank() == 0:
        try:
            check_destination(path, None, overwrite)
            message[0] = str(temporary_folder(path))
        except MoekitError as err:
            message[0] = err
    dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], MoekitError):
        raise message[0]
    return Path(message[0])


def _finish(folder: Path, path: Path, outcomes: list, config_from: str | Path | None) -> None:
    weight_map: dict[str, str] = {}
    tensors: dict[str, TensorPlan] = {}
    for _, mapping, planned in outcomes:
        weight_map.update(mapping)
        tensors.update({t.name: t for t in planned})
    write_index(folder, list(tensors.values()), weight_map)
    if config_from:
        for extra in Checkpoint.open(config_from).extra_files():
            shutil.copy2(extra, folder / extra.name)
    replace_folder(folder, path)
