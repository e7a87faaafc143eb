"""moekit's Megatron-Core upcycling against real megatron-core models built on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit import MoekitError, UpcycleSpec
from moekit.upcycling import megatron

pytest.importorskip("megatron.core")

from . import megatron_workers  # noqa: E402


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, dict]:
    """``megatron_workers.VARIANTS`` upcycled in one process (megatron-core imports slowly)."""
    return torch.load(megatron_workers.spawn(megatron_workers.upcycling_variants, 1,
                                             tmp_path_factory.mktemp("variants")))


def test_exact_upcycling_keeps_the_dense_logits(variants):
    """Softmax after the top-k and sigmoid with top-k > 1 renormalise the routing weights;
    a softmax over every expert sums to one; a top-k scaling factor is divided out; biases
    (add_bias_linear) and gated GELU MLPs included."""
    assert variants.keys() == megatron_workers.VARIANTS.keys()
    for name, found in variants.items():
        assert found["exact_error"] < 1e-5, name


def test_megatron_scaling_is_megatron_cores_state_dict_except_where_megatron_core_is_wrong(
        variants):
    assert all(found["keys_match"] for found in variants.values())
    # Sigmoid routing included: megatron-core scales by G there, not by R·G²/k.
    for name in ("softmax", "sigmoid", "pre_softmax_every_expert"):
        assert variants[name]["megatron_differ"] == [], name
    # megatron-core leaves the router bias (add_bias_linear) ungrouped when G > 1, which
    # breaks the virtual groups; moekit groups it like the weight.
    for name in ("softmax_bias", "scaling_factor"):
        assert variants[name]["megatron_differ"] == [
            f"decoder.layers.{layer}.mlp.router.bias" for layer in range(2)], name
        assert variants[name]["router_biases_grouped"] == [True] * 4
    # With a gated MLP whose activation is not SiLU, megatron-core slices fc1 across its gate
    # and up halves; moekit slices within each half (its exact upcycling keeps the logits).
    assert variants["gated_gelu"]["megatron_differ"] == [
        f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1.weight"
        for layer in range(2) for e in range(4)]


def test_megatron_cores_scaling_does_not_keep_the_dense_function(variants):
    """Its cube-root scaling of all three projections keeps magnitudes, not the function
    (SiLU is not homogeneous); this is why moekit scales only linear_fc2 by default."""
    assert variants["softmax"]["megatron_error"] > 1e-3


def test_exact_upcycling_into_shared_experts_keeps_the_dense_logits(tmp_path):
    """Gated by a sigmoid (megatron-core's moe_shared_expert_gate) or not."""
    found = torch.load(megatron_workers.spawn(megatron_workers.shared_experts, 1, tmp_path))
    assert found.keys() == {True, False}
    assert all(error < 1e-5 for error in found.values()), found


def test_virtual_pipeline_chunks_are_upcycled_chunk_by_chunk(tmp_path):
    found = torch.load(megatron_workers.spawn(megatron_workers.virtual_pipeline, 1, tmp_path))
    assert found["returned"] == (7, 0.0)
    assert found["error"] < 1e-5


def test_each_expert_parallel_rank_gets_its_own_experts(tmp_path):
    one = torch.load(megatron_workers.spawn(megatron_workers.expert_parallel, 1,
                                            tmp_path / "one") + ".0")
    result = megatron_workers.spawn(megatron_workers.expert_parallel, 2, tmp_path / "two")
    two = [torch.load(f"{result}.{r}") for r in range(2)]
    assert one["megatron_equal"] and all(r["megatron_equal"] for r in two)
    assert one["n_expert_tensors"] == 2 * 2 * 4 * 2 + 2
    assert [sorted(r["drop_fc1"]) for r in two] == [[0, 1], [2, 3]]
    for r in two:
        for expert, tensor in r["drop_fc1"].items():
            assert torch.equal(tensor, one["drop_fc1"][expert])
    assert not torch.equal(one["drop_fc1"][0], one["drop_fc1"][1])


def _config(**settings):
    """A real Megatron-Core MoE config: 4 experts, top-2, MoE ffn 32, gated SiLU."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)
    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                             ffn_hidden_size=64, gated_linear_unit=True, activation_func=F.silu,
                             use_cpu_initialization=True, **{**moe, **settings})


def _moe_layer(grouped: bool, config=None) -> nn.Module:
    """A module named like a Megatron-Core MoE layer whose experts are stored as
    TEGroupedMLP stores them (``linear_fc1.weight{i}``, from Transformer Engine's
    GroupedLinear) or as SequentialMLP does (``local_experts.{i}.linear_fc1.weight``).
    TEGroupedMLP itself needs Transformer Engine and a GPU, so its naming is checked here
    against its source's convention rather than a built model."""
    layer = nn.Module()
    layer.config, layer.local_expert_indices = config or _config(), [2, 3]
    ffn = layer.config.moe_ffn_hidden_size
    layer.router = nn.Linear(32, 4, bias=False)
    layer.experts = nn.Module()
    if grouped:
        for fc, shape in (("linear_fc1", (2 * ffn, 32)), ("linear_fc2", (32, ffn))):
            linear = nn.Module()
            for i in range(2):
                linear.register_parameter(f"weight{i}", nn.Parameter(torch.zeros(shape)))
            setattr(layer.experts, fc, linear)
    else:
        layer.experts.local_experts = nn.ModuleList(
            nn.ModuleDict({"linear_fc1": nn.Linear(32, 2 * ffn, bias=False),
                           "linear_fc2": nn.Linear(ffn, 32, bias=False)}) for _ in range(2))
    model = nn.Module()
    model.mlp = layer
    return model


def _dense_layer() -> nn.Module:
    dense = nn.Module()
    dense.mlp = nn.ModuleDict({"linear_fc1": nn.Linear(32, 128, bias=False),
                               "linear_fc2": nn.Linear(64, 32, bias=False)})
    return dense


@pytest.mark.parametrize("settings,message", [
    (dict(moe_router_score_function="sigmoid", moe_router_topk=1, moe_ffn_hidden_size=64),
     "top-1 sigmoid routing weight"),
    (dict(moe_router_pre_softmax=True), "softmax over all 4 experts"),
    (dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0),
     "softmax over all 4 experts"),
    (dict(moe_router_topk_scaling_factor=float("inf")), "scaling_factor is inf"),
    (dict(moe_shared_expert_intermediate_size=32), "shared experts"),
    (dict(moe_apply_probs_on_input=True, moe_router_topk=1, moe_router_pre_softmax=True,
          moe_ffn_hidden_size=64), "experts' input"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=2), "splits the virtual groups"),
])
def test_exact_upcycling_is_refused_where_the_routing_weights_have_no_constant_sum(
        settings, message):
    with pytest.raises(MoekitError, match=message) as err:
        megatron.upcycle_state_dict(_moe_layer(False, _config(**settings)), _dense_layer())
    assert "scaling='megatron'" in str(err.value)


@pytest.mark.parametrize("setting,message", [
    (dict(router_std=0.1), "router_std does not apply"),
    (dict(target="mixtral"), "target 'mixtral' does not apply"),
])
def test_spec_settings_this_path_would_ignore_are_refused(setting, message):
    spec = UpcycleSpec(4, 2, "granular", 2, **setting)
    with pytest.raises(MoekitError, match=message):
        megatron.upcycle_state_dict(_moe_layer(False), _dense_layer(), spec)


@pytest.mark.parametrize("settings,message", [
    ({}, "dense MLP of 64 rows; the MoE model has none"),
    (dict(moe_shared_expert_intermediate_size=32), "dense MLP of 64 rows; the MoE model's have 32"),
])
def test_a_shared_expert_the_dense_mlp_does_not_fill_whole_is_refused(settings, message):
    with pytest.raises(MoekitError, match=message):
        megatron.upcycle_state_dict(_moe_layer(False, _config(**settings)), _dense_layer(),
                                    UpcycleSpec(4, 2, "granular", 2, shared_expert=True))


def test_drop_upcycling_of_a_layer_without_its_layer_number_is_refused():
    """Its draws are seeded by the layer index, which megatron-core's TransformerLayer
    gives the MoE layer (``layer_number``)."""
    with pytest.raises(MoekitError, match="mlp: Drop-Upcycling .* has no layer_number"):
        megatron.upcycle_state_dict(_moe_layer(False, _config(moe_ffn_hidden_size=64)),
                                    _dense_layer(), UpcycleSpec(4, 2, "drop"))


def test_te_grouped_naming_holds_the_same_experts_as_sequential_naming():
    torch.manual_seed(0)
    dense = _dense_layer()
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
