"""Worker functions of the multi-process expert-parallel tests (spawned, gloo on CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from moekit import MoekitError, convert_state_dict, expert_range, load_experts, save_experts
from moekit.sources import FileSource

from .conftest import load_all


def _init(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def load_check_save(rank: int, world: int, store: str, src: str, out: str,
                    mesh_shape: tuple[int, ...], names: tuple[str, ...], layout: str) -> None:
    """Load this rank's experts, check rows and full_tensor(), save back to ``out``."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    ep = names.index("ep") if "ep" in names else 0
    state = load_experts(src, mesh, layout=layout)
    reference = convert_state_dict(load_all(Path(src)), "hf", layout)
    assert state.keys() == reference.keys()
    mine = expert_range(10, mesh.size(ep), mesh.get_local_rank(ep))
    grouped = [k for k, v in state.items() if isinstance(v, DTensor)]
    assert len(grouped) == 2 * 3
    for key, value in state.items():
        if isinstance(value, DTensor):
            assert value.shape == reference[key].shape
            assert torch.equal(value.to_local(), reference[key][mine.start:mine.stop])
            assert torch.equal(value.full_tensor(), reference[key])
        else:
            assert torch.equal(value, reference[key])
    save_experts(state, out, mesh, layout=layout, config_from=src)
    dist.destroy_process_group()


def load_recording_reads(rank: int, world: int, store: str, src: str, log_dir: str) -> None:
    """Load while recording which experts the reader is asked for."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    asked: list[int] = []
    original = FileSource.read

    def read(self, region):
        match = re.search(r"\.experts\.(\d+)\.", region.key)
        if match:
            asked.append(int(match[1]))
        elif ".experts." in region.key:
            asked.append(region.region[0])
        return original(self, region)

    FileSource.read = read
    load_experts(src, mesh, layout="vllm")
    Path(log_dir, f"{rank}.json").write_text(json.dumps(sorted(set(asked))))
    dist.destroy_process_group()


def load_expecting_error(rank: int, world: int, store: str, src: str, log_dir: str) -> None:
    """Load; write "ok" or the error message to ``log_dir/rank.txt``."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    try:
        load_experts(src, mesh)
        outcome = "ok"
    except MoekitError as err:
        outcome = str(err)
    Path(log_dir, f"{rank}.txt").write_text(outcome)
    dist.destroy_process_group()
