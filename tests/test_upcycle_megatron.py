"""moekit's Megatron-Core upcycling against real megatron-core models built on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from moekit.upcycling import megatron

pytest.importorskip("megatron.core")

from . import megatron_workers  # noqa: E402


def _run(fn, world: int, tmp_path, *args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    result = str(tmp_path / "result")
    mp.spawn(fn, args=(world, str(tmp_path / "store"), *args, result), nprocs=world, join=True)
    return result


@pytest.mark.parametrize("bias", [False, True])
def test_exact_upcycling_keeps_the_dense_logits_and_megatron_scaling_matches_megatron_core(
        bias, tmp_path):
    found = torch.load(_run(megatron_workers.exact_and_megatron_parity, 1, tmp_path, bias))
    assert found["keys_match"]
    assert found["same"] == found["tensors"], "moekit's Megatron scaling differs from megatron-core"
    assert found["router_biases"] == (2 if bias else 0) and found["grouped"]
    assert found["exact_error"] < 1e-5
    # Megatron-Core's cube-root scaling of all three projections does not keep the function
    # (SiLU is not homogeneous); this is why moekit scales only linear_fc2 by default.
    assert found["megatron_error"] > 1e-3


def test_virtual_pipeline_chunks_are_upcycled_chunk_by_chunk(tmp_path):
    found = torch.load(_run(megatron_workers.virtual_pipeline, 1, tmp_path))
    assert found["returned"] == (7, 0.0)
    assert found["error"] < 1e-5


def test_each_expert_parallel_rank_gets_its_own_experts(tmp_path):
    one = torch.load(_run(megatron_workers.expert_parallel, 1, tmp_path / "one") + ".0")
    two = [torch.load(_run(megatron_workers.expert_parallel, 2, tmp_path / "two") + f".{r}")
           for r in range(2)]
    assert one["megatron_equal"] and all(r["megatron_equal"] for r in two)
    assert one["n_expert_tensors"] == 2 * 2 * 4 * 2 + 2
    assert [sorted(r["drop_fc1"]) for r in two] == [[0, 1], [2, 3]]
    for r in two:
        for expert, tensor in r["drop_fc1"].items():
            assert torch.equal(tensor, one["drop_fc1"][expert])
    assert not torch.equal(one["drop_fc1"][0], one["drop_fc1"][1])


class _Config:
    """The MoE settings moekit reads from a Megatron-Core MoE layer's ``config``."""

    num_moe_experts, moe_router_topk, moe_ffn_hidden_size = 4, 2, 32
    gated_linear_unit, moe_router_pre_softmax, activation_func = True, False, F.silu


def _moe_layer(grouped: bool) -> nn.Module:
    """A module named like a Megatron-Core MoE layer whose experts are stored as
    TEGroupedMLP stores them (``linear_fc1.weight{i}``, from Transformer Engine's
    GroupedLinear) or as SequentialMLP does (``local_experts.{i}.linear_fc1.weight``).
    TEGroupedMLP itself needs Transformer Engine and a GPU, so its naming is checked here
    against its source's convention rather than a built model."""
    layer = nn.Module()
    layer.config, layer.local_expert_indices = _Config(), [2, 3]
    layer.router = nn.Linear(32, 4, bias=False)
    layer.experts = nn.Module()
    if grouped:
        for fc, shape in (("linear_fc1", (64, 32)), ("linear_fc2", (32, 32))):
            linear = nn.Module()
            for i in range(2):
                linear.register_parameter(f"weight{i}", nn.Parameter(torch.zeros(shape)))
            setattr(layer.experts, fc, linear)
    else:
        layer.experts.local_experts = nn.ModuleList(
            nn.ModuleDict({"linear_fc1": nn.Linear(32, 64, bias=False),
                           "linear_fc2": nn.Linear(32, 32, bias=False)}) for _ in range(2))
    model = nn.Module()
    model.mlp = layer
    return model


def test_te_grouped_naming_holds_the_same_experts_as_sequential_naming():
    torch.manual_seed(0)
    dense = nn.Module()
    dense.mlp = nn.ModuleDict({"linear_fc1": nn.Linear(32, 128, bias=False),
                               "linear_fc2": nn.Linear(64, 32, bias=False)})
    grouped, sequential = _moe_layer(True), _moe_layer(False)
    sequential.load_state_dict(grouped.state_dict(), strict=False)
    sequential.mlp.router.load_state_dict(grouped.mlp.router.state_dict())
    te = megatron.upcycle_state_dict(grouped, dense)["model"]
    seq = megatron.upcycle_state_dict(sequential, dense)["model"]
    grouped.load_state_dict(te, strict=True)
    for local in range(2):
        for fc in ("linear_fc1", "linear_fc2"):
            assert torch.equal(te[f"mlp.experts.{fc}.weight{local}"],
                               seq[f"mlp.experts.local_experts.{local}.{fc}.weight"])
    # Local experts 0 and 1 are global experts 2 and 3: slices 0 and 1 of the dense MLP.
    fc2 = dense.mlp["linear_fc2"].weight
    assert torch.equal(te["mlp.experts.linear_fc2.weight1"], fc2[:, 32:] * 2)
