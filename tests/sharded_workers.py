"""Worker functions of the whole-model sharded load tests (spawned, gloo on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from moekit import MoekitError, load_sharded, samples
from moekit.sources import FileSource

from .ep_workers import finish

NAMES = ("dp", "ep")


def _init(rank: int, world: int, store: str, shape: tuple[int, int]):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    return init_device_mesh("cpu", shape, mesh_dim_names=NAMES)


def _fully_shard(model: torch.nn.Module, dp_mesh, replicate: tuple[str, ...]
                 ) -> torch.nn.Module:
    """FSDP2 over ``dp_mesh`` on every decoder layer and the root, leaving out the experts
    (they run with expert parallelism, which transformers' MoE module does not take as
    DTensors) and the parameters named in ``replicate``."""
    experts = [set(layer.mlp.experts.parameters()) for layer in model.model.layers]
    for layer, ignored in zip(model.model.layers, experts):
        fully_shard(layer, mesh=dp_mesh, ignored_params=ignored)
    kept = {p for name, p in model.named_parameters() if name in replicate}
    fully_shard(model, mesh=dp_mesh, ignored_params=kept.union(*experts))
    return model


def load_into_fsdp(rank: int, world: int, store: str, src: str, log_dir: str,
                   shape: tuple[int, int], n_experts: int, replicate: tuple[str, ...]) -> None:
    """Load with load_sharded while counting the bytes read; check every non-expert DTensor
    against the one FSDP2 makes of the checkpoint's own model; load the state strictly
    into a differently initialised fully_shard-ed model and compare its logits with the
    unsharded model's. Writes ``log_dir/rank.json``: bytes read and logits equality."""
    mesh = _init(rank, world, store, shape)
    counted = [0]
    original = FileSource.read

    def read(self, region):
        counted[0] += self.block_bytes(region)
        return original(self, region)

    FileSource.read = read
    state = load_sharded(src, mesh, layout="transformers", replicate=replicate)
    FileSource.read = original

    ids = samples.sample_input(96)
    reference = samples.build_model("qwen3_moe", num_experts=n_experts)
    with torch.no_grad():
        expected = reference(ids).logits
    oracle = _fully_shard(reference, mesh["dp"], replicate).state_dict()
    assert state.keys() == oracle.keys()
    for key, theirs in oracle.items():
        ours = state[key]
        if ".experts." in key:
            assert (ours.device_mesh, ours.placements) == (mesh, (Replicate(), Shard(0))), key
            assert torch.equal(ours.full_tensor(), theirs), key
            continue
        if key in replicate:
            assert type(ours) is torch.Tensor and torch.equal(ours, theirs), key
            continue
        assert isinstance(theirs, DTensor) and isinstance(ours, DTensor), key
        assert (ours.device_mesh, ours.placements) == (theirs.device_mesh, theirs.placements)
        assert (ours.shape, ours.stride()) == (theirs.shape, theirs.stride()), key
        assert ours.to_local().shape == theirs.to_local().shape, key
        assert torch.equal(ours.to_local(), theirs.to_local()), key

    model = _fully_shard(samples.build_model("qwen3_moe", seed=1, num_experts=n_experts),
                         mesh["dp"], replicate)
    whole = {k: v.full_tensor() if ".experts." in k else v for k, v in state.items()}
    set_model_state_dict(model, whole, options=StateDictOptions(strict=True))
    with torch.no_grad():
        got = model(ids).logits
    Path(log_dir, f"{rank}.json").write_text(json.dumps(
        {"bytes": counted[0], "logits_equal": torch.equal(got, expected)}))
    finish()


def load_expecting_error(rank: int, world: int, store: str, src: str, log_dir: str,
                         shape: tuple[int, int]) -> None:
    """load_sharded, then load_sharded naming an expert dimension the mesh lacks; write "ok"
    or the error messages to ``log_dir/rank.txt`` and ``log_dir/rank.mesh.txt``."""
    mesh = _init(rank, world, store, shape)
    for suffix, options in (("", {}), (".mesh", {"ep_dim": "tp"})):
        try:
            load_sharded(src, mesh, **options)
            outcome = "ok"
        except MoekitError as err:
            outcome = str(err)
        Path(log_dir, f"{rank}{suffix}.txt").write_text(outcome)
    finish()
