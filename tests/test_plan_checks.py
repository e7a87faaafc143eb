"""Planning-time validation: absurd counts answered at once, config.json read and checked
(expert count, MoE layers, router rows, FP8 scale shapes), pieces of different dtypes
never joined, options and library arguments refused with a MoekitError naming them, and
naming disagreements summarised in one message.

The checkpoints are synthetic and tiny (qwen-style keys, [I, H] = [2, 4] experts), written
with safetensors, so that every case runs in milliseconds; the Qwen3-MoE sample of
conftest.py stands in for a real checkpoint where one is needed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moekit import ExpertAdapter, MoekitError, PlanError, convert, convert_state_dict, load
from moekit.cli import main
from moekit.upcycling import UpcycleSpec, upcycle_state_dict
from moekit.expert_parallel import expert_range, load_experts
from moekit.expert_parallel.report import ep_report
from moekit.model_config import (ConfigValues, after_dense_prefix, block_types,
                                 listed_or_interleaved, sparse_step)

from .conftest import answered_at_once, load_all, same_bytes

H, I = 4, 2


def experts(layers: int = 2, n: int = 4, dtypes: dict[str, torch.dtype] | None = None,
            first_layer: int = 0) -> dict[str, torch.Tensor]:
    """A qwen-style MoE state dict: embedding, per layer a router and ``n`` experts."""
    dtypes = dtypes or {}
    generator = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(8, H, generator=generator)}
    for layer in range(first_layer, first_layer + layers):
        block = f"model.layers.{layer}.mlp"
        tensors[f"{block}.gate.weight"] = torch.randn(n, H, generator=generator)
        for e in range(n):
            for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                tensors[f"{block}.experts.{e}.{proj}_proj.weight"] = torch.randn(
                    shape, generator=generator).to(dtypes.get(proj, torch.float32))
    return tensors


def qwen3_config(layers: int = 2, n: int = 4, **changes) -> dict:
    config = {"model_type": "qwen3_moe", "num_experts": n, "num_hidden_layers": layers,
              "hidden_size": H, "moe_intermediate_size": I}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not ...}


def write(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None,
          metadata: dict[str, str] | None = None) -> Path:
    """One-file checkpoint at ``folder`` (with ``config`` as its config.json)."""
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt", **(metadata or {})})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def fails(capsys, args: list[str]) -> str:
    """Run the CLI expecting exit 2 at once (``answered_at_once``); return its one message."""
    with answered_at_once():
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("moekit: error: ") and "Traceback" not in err
    return err


def quickly(call, *args, **kwargs) -> str:
    """The MoekitError message ``call`` raises, at once (``answered_at_once``)."""
    with answered_at_once(), pytest.raises(MoekitError) as raised:
        call(*args, **kwargs)
    return str(raised.value)


# -- section 4: nothing a header or config declares is iterated over -----------------------

def test_a_config_declaring_100_million_experts(tmp_path, capsys):
    src = write(tmp_path / "src", experts(), qwen3_config(num_experts=100_000_000))
    err = fails(capsys, ["convert", str(src), str(tmp_path / "out"), "--to", "nemo", "--dry-run"])
    assert "config.json: num_experts is 100000000" in err and "65536" in err


@pytest.mark.parametrize("key,value", [("num_nextn_predict_layers", 10**7),
                                       ("num_nextn_predict_layers", 2**64),
                                       ("num_hidden_layers", 10**8)])
def test_a_config_declaring_millions_of_layers(family_checkpoints, tmp_path, capsys, key,
                                                 value):
    """Work done per declared layer (Megatron-Core's entries and MTP depths, the headers
    planned from a config alone) is bounded: each command refuses such a config at once."""
    src = Path(shutil.copytree(family_checkpoints["deepseek_v3"], tmp_path / "src"))
    megatron = convert(src, tmp_path / "megatron", to="megatron") and tmp_path / "megatron"
    for folder in (src, megatron):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
    assert f"{key} is {value}; moekit reads models of at most" in fails(
        capsys, ["inspect", str(megatron)])
    fails(capsys, ["convert", str(src), str(tmp_path / "out"), "--to", "megatron", "--dry-run"])
    fails(capsys, ["plan", str(src / "config.json"), "--ep", "2"])


def test_grouped_tensors_of_100_million_empty_experts(tmp_path, capsys):
    block = "model.layers.0.mlp.experts"
    tensors = {f"{block}.gate_and_up_projs": torch.empty(100_000_000, 0, 8),
               f"{block}.down_projs": torch.empty(100_000_000, 4, 0)}
    src = write(tmp_path / "src", tensors, metadata={"moekit.layout": "nemo"})
    assert (src / "model.safetensors").stat().st_size < 5000
    err = fails(capsys, ["inspect", str(src)])
    assert f"{block}.gate_and_up_projs has shape [100000000, 0, 8]" in err and "65536" in err


def test_grouped_tensors_of_empty_experts(tmp_path, capsys):
    block = "model.layers.0.mlp.experts"
    tensors = {f"{block}.gate_and_up_projs": torch.empty(4, 0, 8),
               f"{block}.down_projs": torch.empty(4, 4, 0)}
    src = write(tmp_path / "src", tensors, metadata={"moekit.layout": "nemo"})
    assert "its experts hold no elements" in fails(capsys, ["inspect", str(src)])


def test_a_malformed_grouped_tensor_is_not_also_called_missing(tmp_path, capsys):
    block = "model.layers.0.mlp.experts"
    tensors = {f"{block}.gate_and_up_projs": torch.empty(4, 8, 3),
               f"{block}.down_projs": torch.empty(4, 4, 0)}
    src = write(tmp_path / "src", tensors, metadata={"moekit.layout": "nemo"})
    err = fails(capsys, ["inspect", str(src)])
    assert "not divisible among gate/up" in err and "hold no elements" in err
    assert "is missing" not in err


def test_per_expert_weights_that_hold_nothing(tmp_path, capsys):
    tensors = {k: (v[:0] if "gate_proj" in k else v) for k, v in experts().items()}
    src = write(tmp_path / "src", tensors)
    assert "gate_proj is [0, 4] F32: the experts' weights hold no elements" in fails(
        capsys, ["inspect", str(src)])


@pytest.mark.parametrize("config", [qwen3_config(), None], ids=["config", "no config"])
def test_an_expert_numbered_999999999(config, tmp_path, capsys):
    tensors = experts()
    for proj in ("gate", "up", "down"):
        tensors[f"model.layers.1.mlp.experts.999999999.{proj}_proj.weight"] = \
            tensors[f"model.layers.1.mlp.experts.0.{proj}_proj.weight"].clone()
    src = write(tmp_path / "src", tensors, config)
    err = fails(capsys, ["convert", str(src), str(tmp_path / "out"), "--to", "vllm"])
    limit = "4 experts" if config else "65536 experts moekit plans for"
    assert f"layer 1: expert 999999999 beyond the {limit}" in err
    assert not (tmp_path / "out").exists()


def test_missing_experts_of_a_huge_count_are_ranges_not_a_list():
    tensors = experts(n=4)
    message = quickly(convert_state_dict, tensors, "hf", "nemo", n_experts=65536)
    assert "experts 4-65535 lack gate_proj, up_proj, down_proj" in message
    assert "beyond" not in message
    assert "n_experts is 65537" in quickly(ExpertAdapter, "nemo", n_experts=65537)


def test_a_config_declaring_a_billion_layers(tmp_path, capsys):
    src = write(tmp_path / "src", experts(), qwen3_config(num_hidden_layers=1_000_000_000))
    err = fails(capsys, ["inspect", str(src)])
    assert "layers 2-65 and 999999934 more hold no expert tensors" in err


@pytest.mark.parametrize("step", [1, 3])
def test_a_config_declaring_more_layers_than_a_machine_word_counts(step, tmp_path, capsys):
    src = write(tmp_path / "src", experts(layers=3, first_layer=0),
                qwen3_config(num_hidden_layers=2**64, decoder_sparse_step=step))
    err = fails(capsys, ["inspect", str(src)])
    moe_layers = -(-(2**64 - (step - 1)) // step)
    present = 3 if step == 1 else 1
    assert f" and {moe_layers - present - 64} more hold no expert tensors" in err


def test_ep_plan_of_a_config_declaring_100_million_experts(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**qwen3_config(), "num_experts": 100_000_000}))
    assert "num_experts is 100000000" in fails(capsys, ["plan", str(config), "--ep", "8"])


# -- section 5: the expert count from every config key -------------------------------------

@pytest.mark.parametrize("value", [8.0, "8", True, -1, None, [8]])
def test_a_count_that_is_not_a_whole_number(value, tmp_path, capsys):
    src = write(tmp_path / "src", experts(), qwen3_config(num_experts=value))
    err = fails(capsys, ["inspect", str(src)])
    assert f"{src / 'config.json'}: num_experts is {json.dumps(value)}; expected a whole number" in err


def test_count_keys_that_disagree_are_named(tmp_path, capsys):
    src = write(tmp_path / "src", experts(), qwen3_config(num_local_experts=6))
    err = fails(capsys, ["inspect", str(src)])
    assert "num_experts 4, num_local_experts 6" in err and "make them agree" in err


@pytest.mark.parametrize("model_type,key", [("qwen3_moe", "num_local_experts"),
                                            ("deepseek_v3", "num_local_experts"),
                                            ("qwen3_moe", "num_experts")])
def test_the_count_is_read_from_every_name_transformers_gives_it(model_type, key):
    config = {"model_type": model_type, key: 6, "num_hidden_layers": 2,
              "first_k_dense_replace": 0}
    message = quickly(convert_state_dict, experts(n=4), "hf", "nemo", config=config)
    assert "experts 4-5 lack gate_proj, up_proj, down_proj" in message


def mixtral_named(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` under Mixtral's names (block_sparse_moe, w1/w3/w2)."""
    return {k.replace(".mlp.", ".block_sparse_moe.").replace("gate_proj", "w1")
            .replace("up_proj", "w3").replace("down_proj", "w2"): v for k, v in tensors.items()}


def test_mixtral_reads_num_experts_as_transformers_aliases_it():
    tensors = mixtral_named(experts(n=4))
    config = {"model_type": "mixtral", "num_experts": 3, "num_hidden_layers": 2}
    message = quickly(convert_state_dict, tensors, "hf", "nemo", config=config)
    assert "expert 3 beyond the 3 experts the config given declares (num_experts)" in message


# -- section 5: router rows, MoE layers, FP8 scale shapes ----------------------------------

def test_router_rows_must_match_the_expert_count(tmp_path, capsys):
    tensors = experts()
    tensors["model.layers.1.mlp.gate.weight"] = tensors["model.layers.1.mlp.gate.weight"][:3]
    src = write(tmp_path / "src", tensors, qwen3_config())
    err = fails(capsys, ["inspect", str(src)])
    assert "layer 1: router model.layers.1.mlp.gate.weight is [3, 4], expected [4, 4]" in err


def test_a_score_correction_bias_must_have_a_row_per_expert():
    tensors = experts()
    tensors["model.layers.0.mlp.gate.e_score_correction_bias"] = torch.zeros(5)
    message = quickly(convert_state_dict, tensors, "hf", "nemo", family="deepseek_v3")
    assert "model.layers.0.mlp.gate.e_score_correction_bias is [5], expected [4]" in message


def test_an_moe_layer_beyond_num_hidden_layers(tmp_path, capsys):
    src = write(tmp_path / "src", experts(layers=3), qwen3_config(layers=2))
    err = fails(capsys, ["inspect", str(src)])
    assert "layer 2 holds experts, but" in err and "gives the model 2 decoder layers" in err
    message = quickly(convert_state_dict, experts(layers=3), "hf", "nemo",
                      config=qwen3_config(layers=2))
    assert "layer 2 holds experts" in message


def test_a_missing_moe_layer_in_a_checkpoint(tmp_path, capsys):
    tensors = {k: v for k, v in experts(layers=3).items() if "layers.1.mlp.experts" not in k}
    src = write(tmp_path / "src", tensors, qwen3_config(layers=3))
    err = fails(capsys, ["inspect", str(src)])
    assert "layer 1 holds no expert tensors, but" in err and "makes it an MoE layer" in err


def test_a_state_dict_may_be_part_of_a_model():
    """A pipeline stage's state dict holds some layers: none is required."""
    stage = experts(layers=2, first_layer=4)
    grouped = convert_state_dict(stage, "hf", "nemo", config=qwen3_config(layers=8))
    assert "model.layers.5.mlp.experts.down_projs" in grouped


@pytest.mark.parametrize("changes,layers,problem", [
    ({"first_k_dense_replace": 2}, (1, 2), "layer 1 holds experts, but {config} makes it a dense "
     "layer (num_hidden_layers 3, first_k_dense_replace 2)"),
    ({"first_k_dense_replace": 0}, (1, 2), "layer 0 holds no expert tensors"),
    ({"first_k_dense_replace": 1, "num_nextn_predict_layers": 1}, (1, 2, 3), None),
    ({"first_k_dense_replace": 1, "num_nextn_predict_layers": 0}, (1, 2, 3),
     "layer 3 holds experts, but {config} gives the model 3 decoder layers"),
])
def test_deepseek_dense_layers_and_multi_token_prediction(changes, layers, problem, tmp_path,
                                                         capsys):
    tensors = {k: v for k, v in experts(layers=4).items()
               if ".layers." not in k or int(k.split(".")[2]) in layers}
    config = {"model_type": "deepseek_v3", "n_routed_experts": 4, "num_hidden_layers": 3,
              **changes}
    src = write(tmp_path / "src", tensors, config)
    if problem is None:
        assert main(["inspect", str(src)]) == 0
    else:
        assert problem.format(config=src / "config.json") in fails(capsys, ["inspect", str(src)])


def test_the_moe_layer_rules_of_each_family():
    def moe(rule, **config) -> list[int]:
        layers = rule(ConfigValues(config, "config.json"))
        return list(layers.expected())

    assert moe(sparse_step, num_hidden_layers=6, decoder_sparse_step=2,
               mlp_only_layers=[3]) == [1, 5]
    assert moe(after_dense_prefix, num_hidden_layers=61) == list(range(3, 61))
    assert moe(listed_or_interleaved, num_hidden_layers=6, interleave_moe_layer_step=2) == [1, 3, 5]
    assert moe(listed_or_interleaved, num_hidden_layers=6, moe_layers=[0, 4, 9]) == [0, 4]
    assert moe(block_types, hybrid_override_pattern="ME*EM-") == [1, 3]
    assert moe(block_types, layers_block_type=["moe", "mlp"]) == [0]
    huge = sparse_step(ConfigValues({"num_hidden_layers": 10**12, "decoder_sparse_step": 3,
                                     "mlp_only_layers": [2, 4]}, "config.json"))
    assert huge.size == 10**12 // 3 - 1 and huge.is_moe(10**12 - 2) and not huge.is_moe(2)
    with pytest.raises(MoekitError, match="config.json: decoder_sparse_step is 0"):
        sparse_step(ConfigValues({"num_hidden_layers": 4, "decoder_sparse_step": 0},
                                 "config.json"))
    with pytest.raises(MoekitError, match=r"mlp_only_layers\[1\] is \"1\""):
        sparse_step(ConfigValues({"num_hidden_layers": 4, "mlp_only_layers": [0, "1"]},
                                 "config.json"))


def fp8_experts(scale_shape=None, block: int = 128) -> dict[str, torch.Tensor]:
    """``experts()`` with FP8 weights and float32 block scales (``scale_shape`` replaces the
    shape of expert 1's up scale in layer 0), and an FP8 attention weight beside them."""
    tensors = experts(layers=1)
    for key in [k for k in tensors if ".experts." in k]:
        weight = tensors[key]
        tensors[key] = weight.to(torch.float8_e4m3fn)
        shape = tuple(math.ceil(n / block) for n in weight.shape)
        tensors[key + "_scale_inv"] = torch.rand(shape) + 0.5
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.ones(H, H).to(torch.float8_e4m3fn)
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    if scale_shape:
        tensors["model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"] = torch.ones(scale_shape)
    return tensors


def test_fp8_scales_must_cover_their_weights():
    message = quickly(convert_state_dict, fp8_experts(scale_shape=(2, 1)), "hf", "nemo")
    assert ("layer 0: expert 1 up_proj.weight_scale_inv is [2, 1]; the block scales of a "
            "[2, 4] weight are [1, 1] (ceil(out/128) x ceil(in/128))") in message
    tensors = fp8_experts()
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(2, 2)
    message = quickly(convert_state_dict, tensors, "hf", "nemo")
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv is [2, 2]" in message


def test_fp8_scales_alike_in_every_expert_and_fitting_none_are_listed():
    """Scales of one shape in every expert (for blocks of 2, checked against blocks of
    128): a block whose scales are alike is judged once, and this one is refused for every
    expert, each projection on its line."""
    message = quickly(convert_state_dict, fp8_experts(block=2), "hf", "nemo",
                      config=qwen3_config(layers=1))
    for projection, scale, weight in (("gate", [1, 2], [2, 4]), ("up", [1, 2], [2, 4]),
                                      ("down", [2, 1], [4, 2])):
        assert (f"layer 0: experts 0-3 {projection}_proj.weight_scale_inv are {scale}; the "
                f"block scales of a {weight} weight are [1, 1]") in message


def test_fp8_block_size_comes_from_the_quantization_config(tmp_path):
    tensors = fp8_experts(block=2)
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.rand(2, 2) + 0.5
    config = qwen3_config(layers=1, quantization_config={"weight_block_size": [2, 2]})
    message = quickly(convert_state_dict, tensors, "hf", "nemo", config=qwen3_config(layers=1))
    assert "(ceil(out/128) x ceil(in/128))" in message
    src = write(tmp_path / "src", tensors, config)
    convert(src, tmp_path / "bf16", to="hf", dequantize=True)
    out = load_all(tmp_path / "bf16")
    for key in ("model.layers.0.mlp.experts.2.down_proj.weight",
                "model.layers.0.self_attn.o_proj.weight"):
        weight, scale = tensors[key].float(), tensors[key + "_scale_inv"]
        expected = weight * scale.repeat_interleave(2, 0).repeat_interleave(2, 1)
        assert same_bytes(out[key], expected.to(torch.bfloat16)), key


@pytest.mark.parametrize("size", [[128], [128, 0], [128.0, 128], "128", 128])
def test_a_malformed_weight_block_size(size, tmp_path, capsys):
    config = qwen3_config(layers=1, quantization_config={"weight_block_size": size})
    src = write(tmp_path / "src", fp8_experts(), config)
    assert "quantization_config.weight_block_size is" in fails(capsys, ["inspect", str(src)])


# -- section 5: pieces of different dtypes are never joined --------------------------------

@pytest.mark.parametrize("layout", ["nemo", "transformers", "vllm"])
def test_gate_and_up_of_different_dtypes_are_not_joined(layout, tmp_path, capsys):
    tensors = experts(dtypes={"gate": torch.bfloat16})
    src = write(tmp_path / "src", tensors, qwen3_config())
    err = fails(capsys, ["convert", str(src), str(tmp_path / "out"), "--to", layout])
    assert "layers 0-1: the" not in err  # two layers, listed one by one
    assert ("layer 0: the " + layout + " layout keeps pieces of different dtypes (gate_proj "
            "BF16, up_proj F32, down_proj F32) in one tensor") in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(PlanError, match="does not round"):
        convert_state_dict(tensors, "hf", layout)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert all(same_bytes(load_all(tmp_path / "hf")[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("layout", ["nemo", "transformers", "vllm"])
def test_down_of_another_dtype_round_trips_bit_exactly(layout, tmp_path):
    tensors = experts(dtypes={"down": torch.bfloat16})
    grouped = convert_state_dict(tensors, "hf", layout)
    back = convert_state_dict(grouped, layout, "hf")
    assert back.keys() == tensors.keys() and all(same_bytes(back[k], v)
                                                  for k, v in tensors.items())


def test_a_source_changed_after_planning_is_refused_not_rounded():
    from moekit.executors.memory import run_on_state_dict
    from moekit.layouts import layout_named
    from moekit.planner import analyse, build_plan
    from moekit.conversion import state_dict_meta

    tensors = experts()
    plan = build_plan(analyse(state_dict_meta(tensors), None, {}, "state dict", from_="hf"),
                      layout_named("nemo"))
    key = "model.layers.0.mlp.experts.1.up_proj.weight"
    tensors[key] = tensors[key].double()
    with pytest.raises(MoekitError, match=f"{key} gave \\[2, 4\\] torch.float64 where the plan"):
        run_on_state_dict(plan, tensors)


# -- section 5: options and library arguments ----------------------------------------------

@pytest.mark.parametrize("ep", ["0", "-2"])
def test_ep_must_be_at_least_one(ep, family_checkpoints, capsys):
    err = fails(capsys, ["plan", str(family_checkpoints["qwen3_moe"]), "--ep", ep])
    assert f"--ep {ep}:" in err


def test_ep_sizes_in_the_library(family_checkpoints):
    assert "at least 1" in quickly(ep_report, family_checkpoints["qwen3_moe"], 0)
    assert "cannot split 6 experts over 7 expert-parallel ranks" in quickly(
        ep_report, family_checkpoints["qwen3_moe"], 7)
    assert "ep_size is 2.0" in quickly(expert_range, 10, 2.0, 0)
    assert "ep_rank is True" in quickly(expert_range, 10, 2, True)


@pytest.mark.parametrize("value,found", [
    (None, "is a NoneType, not a torch.Tensor"),
    (np.zeros((2, 4), dtype=np.float32), "is a ndarray, not a torch.Tensor (torch.from_numpy"),
    (3, "is a int, not a torch.Tensor"),
    (torch.zeros(2, 4, dtype=torch.complex64), "has dtype torch.complex64, which moekit does not "
     "handle"),
    (torch.zeros(2, 4, device="meta"), "is on the meta device"),
    (torch.zeros(2, 4).to_sparse(), "is a torch.sparse_coo tensor"),
    pytest.param(lambda: torch.nested.nested_tensor([torch.zeros(2, 4), torch.zeros(3, 4)]),
                 "is a nested tensor (torch.nested)", marks=pytest.mark.filterwarnings(
                     "ignore:The PyTorch API of nested tensors is in prototype stage")),
    (lambda: torch.nested.nested_tensor([torch.zeros(2, 4), torch.zeros(3, 4)],
                                        layout=torch.jagged), "is a nested tensor"),
    (lambda: _fake(torch.zeros(2, 4)), "is a FakeTensor (torch's FakeTensorMode)"),
], ids=["None", "numpy", "int", "complex", "meta", "sparse", "nested", "jagged", "fake"])
def test_state_dict_values_that_are_not_tensors_of_data(value, found):
    """Each refused naming the key by every entry point that takes a state dict, the
    tensor an expert's or not."""
    value = value() if callable(value) else value
    for key in ("model.layers.1.mlp.experts.2.up_proj.weight", "model.norm.weight"):
        tensors = {**experts(), key: value}
        for call in (lambda: convert_state_dict(tensors, "hf", "nemo"),
                     lambda: ExpertAdapter("nemo", family="qwen3_moe").from_hf(tensors),
                     lambda: ExpertAdapter("nemo", family="qwen3_moe").to_hf(tensors),
                     lambda: ExpertAdapter("nemo").validate(tensors),
                     lambda: upcycle_state_dict(tensors, UpcycleSpec(experts=2, top_k=1))):
            message = quickly(call)
            assert key in message and found in message


def _fake(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a FakeTensor: its shape, dtype and device, no data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode().from_tensor(tensor)


def test_strided_views_convert_bit_exactly_both_ways():
    """Transposed, sliced and expanded views of the source: the bytes read are the
    elements, not the storage."""
    tensors = experts()
    views = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in tensors.items()}
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    views[key] = torch.cat([tensors[key], tensors[key]], 1)[:, ::2].clone()[:, :H]
    views[key] = torch.stack([tensors[key], tensors[key]])[1]
    assert not views["model.layers.0.mlp.experts.0.gate_proj.weight"].is_contiguous()
    reference = convert_state_dict(tensors, "hf", "nemo")
    grouped = convert_state_dict(views, "hf", "nemo")
    assert all(same_bytes(grouped[k], reference[k]) for k in reference)
    turned = {k: v.mT.contiguous().mT if v.dim() == 3 else v for k, v in grouped.items()}
    back = convert_state_dict(turned, "nemo", "hf")
    assert all(same_bytes(back[k], tensors[k]) for k in tensors)


def test_built_tensors_do_not_join_the_sources_autograd_graph():
    tensors = {k: v.requires_grad_() for k, v in experts().items()}
    grouped = convert_state_dict(tensors, "hf", "vllm")
    built = grouped["model.layers.0.mlp.experts.routed_experts.w13_weight"]
    assert built.grad_fn is None and not built.requires_grad
    assert grouped["model.embed_tokens.weight"] is tensors["model.embed_tokens.weight"]


def test_a_meta_tensor_outside_the_experts_is_refused_too():
    tensors = {**experts(), "model.norm.weight": torch.zeros(H, device="meta")}
    assert "model.norm.weight is on the meta device" in quickly(
        convert_state_dict, tensors, "hf", "hf")


def test_not_a_state_dict():
    model = torch.nn.Linear(2, 2)
    assert "pass model.state_dict()" in quickly(convert_state_dict, model, "hf", "nemo")
    assert "key 3 of type int" in quickly(convert_state_dict, {3: torch.zeros(1)}, "hf", "nemo")


@pytest.mark.parametrize("kwargs,found", [
    ({"n_experts": 8.0}, "n_experts is 8.0"), ({"n_experts": "8"}, "n_experts is '8'"),
    ({"n_experts": True}, "n_experts is True"), ({"n_experts": -1}, "n_experts is -1"),
    ({"layout": "bogus"}, "unknown layout 'bogus'"), ({"family": "bogus"}, "unknown model family"),
    ({"config": [1]}, "config is a list"),
])
def test_adapter_arguments_are_checked_when_made(kwargs, found):
    assert found in quickly(ExpertAdapter, **kwargs)


@pytest.mark.parametrize("device,found", [
    ("bogus", "device 'bogus' is not a device torch knows"),
    ("cuda:7", "device 'cuda:7' is not on this machine"),
    ("meta", "device 'meta' holds no data"),
])
def test_bad_devices(device, found, family_checkpoints):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    src = family_checkpoints["qwen3_moe"]
    assert found in quickly(load, src, device=device)
    assert found in quickly(load_experts, src, None, device=device)


def test_load_experts_needs_a_device_mesh(family_checkpoints):
    assert "device_mesh is a str" in quickly(load_experts, family_checkpoints["qwen3_moe"], "ep")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_experts_on_two_devices_are_refused_and_one_device_is_kept():
    tensors = {k: v.cuda() for k, v in experts().items()}
    grouped = convert_state_dict(tensors, "hf", "nemo")
    assert grouped["model.layers.0.mlp.experts.down_projs"].device.type == "cuda"
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].cpu()
    assert convert_state_dict(tensors, "hf", "nemo")["model.embed_tokens.weight"].device.type \
        == "cpu"
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    tensors[key] = tensors[key].cpu()
    message = quickly(convert_state_dict, tensors, "hf", "nemo")
    assert "lie on 2 devices" in message and f"{key} on cpu" in message


# -- section 5: one summarised message for a naming disagreement ---------------------------

def big_checkpoint(folder: Path, layers: int = 48, n: int = 128, drop: str | None = None
                   ) -> Path:
    """Qwen3-30B's naming and counts (48 layers x 128 experts: 18,432 expert tensors) with
    one-element tensors; ``drop`` removes the keys containing it."""
    tensors = {"model.embed_tokens.weight": torch.zeros(8, 1)}
    for layer in range(layers):
        block = f"model.layers.{layer}.mlp"
        tensors[f"{block}.gate.weight"] = torch.zeros(n, 1)
        for e in range(n):
            for proj in ("gate", "up", "down"):
                tensors[f"{block}.experts.{e}.{proj}_proj.weight"] = torch.zeros(1, 1)
    if drop:
        tensors = {k: v for k, v in tensors.items() if drop not in k}
    return write(folder, tensors, qwen3_config(layers=layers, n=n))


@pytest.fixture(scope="module")
def qwen3_30b_shaped(tmp_path_factory) -> Path:
    return big_checkpoint(tmp_path_factory.mktemp("big") / "qwen3-30b-shaped")


def test_a_wrong_from_is_one_message(qwen3_30b_shaped, tmp_path, capsys):
    err = fails(capsys, ["convert", str(qwen3_30b_shaped), str(tmp_path / "out"), "--to", "vllm",
                         "--from", "nemo", "--dry-run"])
    assert err.count("\n") == 1
    assert ("the nemo layout (given as the source layout) reads none of the 18432 tensors in "
            "the qwen3_moe expert modules") in err
    assert "the keys look like layout hf: pass --from hf" in err


def test_a_wrong_layout_in_the_metadata_is_one_message(tmp_path, capsys):
    src = write(tmp_path / "src", experts(), qwen3_config(), metadata={"moekit.layout": "vllm"})
    err = fails(capsys, ["inspect", str(src)])
    assert err.count("\n") == 1
    assert "the vllm layout (recorded in the safetensors metadata) reads none" in err


def test_grouped_keys_read_as_hf_name_their_layout(tmp_path, capsys):
    grouped = convert_state_dict(experts(), "hf", "nemo")
    src = write(tmp_path / "src", grouped, qwen3_config())
    err = fails(capsys, ["inspect", str(src), "--from", "hf"])
    assert "the keys look like layout nemo" in err and err.count("\n") == 1


def test_a_config_of_another_family_is_one_message(tmp_path, capsys):
    config = {"model_type": "mixtral", "num_local_experts": 4, "num_hidden_layers": 2}
    src = write(tmp_path / "src", experts(), config)
    err = fails(capsys, ["inspect", str(src)])
    assert err.count("\n") == 1
    assert "the model family is mixtral (config.json model_type mixtral)" in err
    assert "named as in qwen2_moe, qwen3_moe" in err and "fix config.json's model_type" in err


def test_a_family_given_against_the_config():
    message = quickly(convert_state_dict, experts(), "hf", "nemo", family="mixtral",
                      config=qwen3_config())
    assert "the model family is mixtral (given), but the config's model_type qwen3_moe" in message


def test_a_family_given_against_the_key_naming():
    message = quickly(ExpertAdapter("nemo", family="qwen3_moe").from_hf, mixtral_named(experts()))
    assert "the model family is qwen3_moe (given)" in message
    assert ("named as in mixtral, phimoe, minimax, minimax_m2, kimi_linear, mixtral_style "
            "(hf layout)") in message


def test_the_same_problem_in_many_layers_is_one_line(tmp_path, capsys):
    src = big_checkpoint(tmp_path / "src", n=8, drop="experts.5.down_proj")
    err = fails(capsys, ["inspect", str(src)])
    assert "  - layers 0-47: expert 5 lacks down_proj (layers stored in model.safetensors)" in err
    assert err.count("\n") == 2


def test_long_problem_lists_are_capped(tmp_path, capsys):
    tensors = experts(layers=1, n=64)
    for e in range(0, 64, 2):
        key = f"model.layers.0.mlp.experts.{e}.up_proj.weight"
        tensors[key] = torch.zeros(e + 3, H)
    src = write(tmp_path / "src", tensors)
    err = fails(capsys, ["inspect", str(src)])
    assert err.count("\n  - ") == PlanError.LISTED
    assert err.rstrip().endswith("... and 12 more problems")


def test_names_megabytes_long_give_lines_of_bounded_length(tmp_path, capsys):
    """A header may name its tensors with any number of characters: every line moekit
    prints of them is cut to MoekitError.LINE_LIMIT, its start and end kept."""
    long = "x" * 200_000
    tensors = {**experts(), **{f"model.layers.{layer}.mlp.experts.{e}.{long}{layer}{e}.weight":
                               torch.zeros(1) for layer in range(2) for e in range(30)}}
    src = write(tmp_path / "src", tensors, qwen3_config(model_type=long))
    err = fails(capsys, ["inspect", str(src)])
    lines = err.splitlines()
    assert len(lines) == 2 + PlanError.LISTED
    assert max(map(len, lines)) <= MoekitError.LINE_LIMIT + 40
    assert "characters]..." in lines[1] and lines[1].endswith("is the source layout right?)")
    src = write(tmp_path / "named", experts(), qwen3_config(model_type=long))
    assert main(["inspect", str(src)]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) <= MoekitError.LINE_LIMIT + 40


def test_verify_lists_a_hundred_differences_and_counts_the_rest(tmp_path, capsys):
    tensors = experts(layers=10, n=8)
    a = write(tmp_path / "a", tensors, qwen3_config(layers=10, n=8))
    b = write(tmp_path / "b", {k: v + 1 for k, v in tensors.items()}, qwen3_config(layers=10, n=8))
    assert main(["verify", str(a), str(b)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(f"{len(tensors)} differ:") and len(out) == 102
    assert out[-1] == f"  ... and {len(tensors) - 100} more (--json lists every difference)"
    assert main(["verify", str(a), str(b), "--json"]) == 1
    assert len(json.loads(capsys.readouterr().out)["differences"]) == len(tensors)


@pytest.mark.parametrize("size,found", [(0, "less than one byte"), (-1, "less than one byte"),
                                        ("0GB", "less than one byte"), (1.5, "cannot read"),
                                        (True, "cannot read"), (None, "cannot read")])
def test_a_shard_size_that_is_not_a_positive_size_is_refused(size, found, tmp_path):
    src = write(tmp_path / "src", experts(), qwen3_config())
    message = quickly(convert, src, tmp_path / "out", to="nemo", max_shard_size=size,
                      dry_run=True)
    assert found in message


def test_expert_parallelism_refuses_a_per_expert_layout(family_checkpoints):
    """A rank's share of a per-expert layout would be whole tensors renamed from expert 0,
    wrapped as rows of a grouped tensor that does not exist."""
    from moekit.expert_parallel.ranges import rank_plan
    from moekit.planner import understand_checkpoint
    from moekit.checkpoint import Checkpoint

    src = family_checkpoints["qwen3_moe"]
    analysis = understand_checkpoint(Checkpoint.open(src))
    for call in (lambda: rank_plan(analysis, 2, 1, "hf"), lambda: ep_report(src, 2, "hf")):
        message = quickly(call)
        assert "the hf layout keeps one tensor per expert: choose nemo, transformers, vllm" \
            in message
    assert rank_plan(analysis, 2, 1, "nemo").moe_layers == {0: 3, 1: 3, 2: 3}


def test_expert_tensors_all_misshapen_are_read_in_the_layout_that_names_them(tmp_path, capsys):
    block = "model.layers.0.mlp.experts"
    tensors = {f"{block}.gate_up_proj": torch.empty(4, 0, 8),
               f"{block}.down_proj": torch.empty(4, 8, 0)}
    err = fails(capsys, ["inspect", str(write(tmp_path / "src", tensors))])
    assert "layout transformers) is not a valid checkpoint" in err
    assert f"{block}.gate_up_proj has shape [4, 0, 8]: its experts hold no elements" in err


def test_grouped_tensors_of_no_experts_are_refused(tmp_path, capsys):
    """Zero rows are an EP rank's share when it owns no expert; a checkpoint or state dict
    whose every grouped tensor holds none has nothing to convert and is refused, not
    converted into one without its expert tensors."""
    block = "model.layers.0.mlp.experts"
    tensors = {f"{block}.gate_and_up_projs": torch.empty(0, H, 2 * I),
               f"{block}.down_projs": torch.empty(0, I, H),
               "model.embed_tokens.weight": torch.zeros(8, H)}
    src = write(tmp_path / "src", tensors, metadata={"moekit.layout": "nemo"})
    err = fails(capsys, ["convert", str(src), str(tmp_path / "out"), "--to", "hf"])
    assert "layer 0: the expert tensors hold no experts (0 rows)" in err
    assert "hold no experts (0 rows)" in quickly(convert_state_dict, tensors, "nemo", "vllm")


def test_an_index_into_a_region_counts_as_torch_counts_and_is_refused_beyond_it():
    """A region read of a tensor that is itself a region (a Megatron-Core chunk's slice):
    a negative index counts from the end of the outer region, and one beyond it is
    refused rather than read from the rows next to it."""
    from moekit.plan import Read, _within

    outer = Read("k", (slice(2, 7),), (5, 3), "F32")
    source = torch.arange(30).view(10, 3)
    for index in (-1, -5, 0, 4):
        assert torch.equal(source[_within(outer, (index,))], source[2:7][index])
    for index in (-6, 5):
        with pytest.raises(MoekitError, match=f"index {index} of a dimension of 5"):
            _within(outer, (index,))
