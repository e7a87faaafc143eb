"""Upcycling dense transformers checkpoints into MoE checkpoints that transformers loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from moekit import MoekitError, PlanError, UpcycleSpec, samples, upcycle, upcycle_state_dict
from moekit import inspect as moekit_inspect
from moekit.cli import main
from moekit.checkpoint import TensorInfo
from moekit.upcycling.planner import dense_mlps

from .conftest import load_all, tree_digest

SIBLING = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


@pytest.fixture(scope="session")
def dense_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """dense family -> a ``save_pretrained`` checkpoint in several shards."""
    root = tmp_path_factory.mktemp("dense")
    return {family: samples.save_model(samples.build_model(family, seed=3), root / family)
            for family in samples.DENSE_FAMILIES}


@pytest.fixture(scope="session")
def dense_logits(dense_checkpoints) -> dict[str, torch.Tensor]:
    ids = samples.sample_input(96)
    return {family: samples.logits(path, ids) for family, path in dense_checkpoints.items()}


PRESERVING = {
    "copy-4-top2": UpcycleSpec(experts=4, top_k=2),
    "copy-3-top1": UpcycleSpec(experts=3, top_k=1, router="zero"),
    "granular-8-top4-G2": UpcycleSpec(experts=8, top_k=4, method="granular", granularity=2),
    "granular-8-top4-G4": UpcycleSpec(experts=8, top_k=4, method="granular", granularity=4),
    "granular-6-top2-G2-shared": UpcycleSpec(experts=6, top_k=2, method="granular",
                                             granularity=2, shared_expert=True,
                                             target="qwen2_moe"),
}


# Qwen3 attention (q/k norms) has no MoE sibling with a shared expert in transformers.
CASES = [(family, name) for family in samples.DENSE_FAMILIES for name in PRESERVING
         if not (family == "qwen3" and PRESERVING[name].target == "qwen2_moe")]


@pytest.mark.parametrize("family,name", CASES)
def test_upcycled_model_computes_the_dense_function(family, name, dense_checkpoints,
                                                    dense_logits, tmp_path):
    spec = PRESERVING[name]
    result = upcycle(dense_checkpoints[family], tmp_path / "moe", spec, max_shard_size="40KB")
    assert result.spec.preserves_function()[0]
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    expected_family = SIBLING[family] if spec.target == "auto" else spec.target
    assert config["model_type"] == expected_family
    logits = samples.logits(tmp_path / "moe", samples.sample_input(96))
    torch.testing.assert_close(logits, dense_logits[family], rtol=0, atol=1e-5)


WINDOWED = {
    "mistral-every-layer": ("mistral", dict(sliding_window=4), ("mixtral", "qwen2_moe")),
    "mistral-without-a-window-entry": ("mistral", {}, ("mixtral", "qwen2_moe")),
    "qwen2-from-layer-1": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1), ("qwen2_moe",)),
    "qwen3-every-layer": ("qwen3", dict(use_sliding_window=True, sliding_window=4,
                                        max_window_layers=0), ("qwen3_moe",)),
}
"""Dense models attending through sliding windows, and the targets that hold them."""


@pytest.mark.parametrize("case,target", [(case, target) for case, (_, _, targets)
                                         in WINDOWED.items() for target in targets])
def test_an_upcycled_model_attends_through_the_dense_models_windows(case, target, tmp_path):
    """Each family reads sliding-window entries its own way (Qwen2-MoE's default layers
    are not Qwen2's, Mixtral's default window is not Mistral's): on a sequence longer than
    the window, the upcycled model's logits are the dense model's."""
    family, settings, _ = WINDOWED[case]
    dense = samples.save_model(samples.build_model(family, seed=3, **settings), tmp_path / "d")
    dropped = {"qwen2-from-layer-1": "layer_types",  # as transformers 4.x wrote it
               "mistral-without-a-window-entry": "sliding_window"}.get(case)  # Mistral's 4096
    if dropped:
        config = json.loads((dense / "config.json").read_text())
        del config[dropped]
        (dense / "config.json").write_text(json.dumps(config))
    upcycle(dense, tmp_path / "moe", UpcycleSpec(experts=4, top_k=2, target=target))
    ids = samples.sample_input(96, length=4100 if dropped == "sliding_window" else 24)[:1]
    torch.testing.assert_close(samples.logits(tmp_path / "moe", ids), samples.logits(dense, ids),
                               rtol=0, atol=1e-5)


def test_a_window_in_some_layers_only_is_refused_for_a_target_that_slides_in_all(tmp_path):
    dense = samples.save_model(samples.build_model("qwen3", seed=3, use_sliding_window=True,
                                                   sliding_window=4, max_window_layers=2),
                               tmp_path / "d")
    with pytest.raises(MoekitError, match="sliding window in layers 2 only; qwen3_moe would "
                                          "slide it in every layer"):
        upcycle(dense, tmp_path / "moe", UpcycleSpec(experts=4, top_k=2))
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("family", list(samples.DENSE_FAMILIES))
def test_keys_and_config_are_what_transformers_saves(family, dense_checkpoints, tmp_path):
    """The checkpoint has exactly the keys (in the Hub convention) that ``save_pretrained``
    of the target model writes, every non-MLP setting is carried over, and the non-MLP
    tensors are the dense model's, byte for byte."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = UpcycleSpec(experts=4, top_k=2, method="granular", granularity=2)
    upcycle(dense_checkpoints[family], tmp_path / "moe", spec)
    config = AutoConfig.from_pretrained(tmp_path / "moe")
    reference = samples.save_model(AutoModelForCausalLM.from_config(config), tmp_path / "ref")
    moe, dense = load_all(tmp_path / "moe"), load_all(dense_checkpoints[family])
    assert moe.keys() == load_all(reference).keys()
    for key in dense.keys() & moe.keys():
        assert torch.equal(moe[key], dense[key])
    dense_config = json.loads((dense_checkpoints[family] / "config.json").read_text())
    written = json.loads((tmp_path / "moe" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "max_position_embeddings"):
        assert written[key] == dense_config[key], key
    assert written["num_experts_per_tok"] == 2


def _fractions_redrawn(moe: dict, dense: dict, layer: int, n_experts: int) -> list[torch.Tensor]:
    """Per expert, which intermediate neurons differ from the dense MLP (gate rows)."""
    gate = dense[f"model.layers.{layer}.mlp.gate_proj.weight"]
    return [(moe[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"] != gate).any(1)
            for e in range(n_experts)]


def test_drop_upcycling_redraws_a_different_fraction_of_neurons_per_expert(dense_checkpoints,
                                                                           tmp_path):
    spec = UpcycleSpec(experts=6, top_k=2, method="drop", drop_ratio=0.25, seed=7)
    upcycle(dense_checkpoints["llama"], tmp_path / "a", spec)
    upcycle(dense_checkpoints["llama"], tmp_path / "b", spec)
    upcycle(dense_checkpoints["llama"], tmp_path / "c",
            UpcycleSpec(experts=6, top_k=2, method="drop", drop_ratio=0.25, seed=8))
    dense, a = load_all(dense_checkpoints["llama"]), load_all(tmp_path / "a")
    intermediate = dense["model.layers.0.mlp.gate_proj.weight"].shape[0]
    for layer in range(3):
        changed = _fractions_redrawn(a, dense, layer, 6)
        assert all(c.sum().item() == round(0.25 * intermediate) for c in changed)
        assert len({tuple(c.nonzero().flatten().tolist()) for c in changed}) == 6
        up = dense[f"model.layers.{layer}.mlp.up_proj.weight"]
        down = dense[f"model.layers.{layer}.mlp.down_proj.weight"]
        for e, neurons in enumerate(changed):
            w3 = a[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w3.weight"]
            w2 = a[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight"]
            assert torch.equal((w3 != up).any(1), neurons)
            assert torch.equal((w2 != down).any(0), neurons)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert load_all(tmp_path / "a").keys() == load_all(tmp_path / "c").keys()
    assert any(not torch.equal(v, load_all(tmp_path / "c")[k]) for k, v in a.items())


def test_a_drop_ratio_that_redraws_no_neuron_is_refused(dense_checkpoints, tmp_path):
    """Drop-Upcycling redraws round(ratio x I) neurons: below half a neuron the experts
    would be silent copies of the dense MLP."""
    intermediate = load_all(dense_checkpoints["llama"])[
        "model.layers.0.mlp.up_proj.weight"].shape[0]
    spec = UpcycleSpec(experts=2, top_k=1, method="drop", drop_ratio=0.49 / intermediate)
    with pytest.raises(MoekitError, match=f"re-initialises no neuron of an MLP of "
                                          f"{intermediate} intermediate neurons"):
        upcycle(dense_checkpoints["llama"], tmp_path / "moe", spec)
    assert not (tmp_path / "moe").exists()
    upcycle(dense_checkpoints["llama"], tmp_path / "moe",
            UpcycleSpec(experts=2, top_k=1, method="drop", drop_ratio=1 / intermediate))


def test_drop_redraws_from_the_dense_weights_statistics(dense_checkpoints, tmp_path):
    spec = UpcycleSpec(experts=2, top_k=1, method="drop", drop_ratio=1.0)
    moe = upcycle_state_dict(load_all(dense_checkpoints["llama"]), spec)
    dense = load_all(dense_checkpoints["llama"])["model.layers.1.mlp.down_proj.weight"]
    drawn = moe["model.layers.1.block_sparse_moe.experts.0.w2.weight"]
    assert abs(drawn.mean() - dense.mean()) < 0.05 and abs(drawn.std() / dense.std() - 1) < 0.1


def test_state_dict_upcycling_equals_the_file_output(dense_checkpoints, tmp_path):
    spec = UpcycleSpec(experts=8, top_k=4, method="granular", granularity=2, seed=5)
    upcycle(dense_checkpoints["qwen3"], tmp_path / "moe", spec)
    config = json.loads((dense_checkpoints["qwen3"] / "config.json").read_text())
    in_memory = upcycle_state_dict(load_all(dense_checkpoints["qwen3"]), spec, config)
    on_disk = load_all(tmp_path / "moe")
    assert in_memory.keys() == on_disk.keys()
    assert all(torch.equal(in_memory[k], on_disk[k]) for k in on_disk)


def test_granular_router_repeats_rows_within_virtual_groups(dense_checkpoints):
    spec = UpcycleSpec(experts=8, top_k=4, method="granular", granularity=4)
    router = upcycle_state_dict(load_all(dense_checkpoints["llama"]), spec)[
        "model.layers.0.block_sparse_moe.gate.weight"]
    groups = router.view(2, 4, -1)
    assert torch.equal(groups, groups[:, :1].expand_as(groups))
    assert not torch.equal(groups[0, 0], groups[1, 0])


def test_megatron_scaling_is_offered_but_does_not_preserve_the_function(dense_checkpoints,
                                                                        dense_logits, tmp_path):
    spec = UpcycleSpec(experts=4, top_k=2, method="granular", granularity=2, scaling="megatron")
    result = upcycle(dense_checkpoints["llama"], tmp_path / "moe", spec)
    assert not result.spec.preserves_function()[0]
    logits = samples.logits(tmp_path / "moe", samples.sample_input(96))
    assert (logits - dense_logits["llama"]).abs().max() > 1e-4
    moe, dense = load_all(tmp_path / "moe"), load_all(dense_checkpoints["llama"])
    torch.testing.assert_close(moe["model.layers.0.block_sparse_moe.experts.1.w1.weight"],
                               dense["model.layers.0.mlp.gate_proj.weight"][32:] * 2 ** (1 / 3))


@pytest.mark.parametrize("spec,message", [
    (dict(experts=8, top_k=3, method="granular", granularity=2), "multiples of the granularity"),
    (dict(experts=4, top_k=2, granularity=2), "--granularity 2 needs --method granular"),
    (dict(experts=4, top_k=2, method="granular"), "granular needs --granularity 2 or more"),
    (dict(experts=4, top_k=2, method="granular", granularity=0), "--granularity must be at"),
    (dict(experts=4, top_k=5), r"--top-k must lie in 1\.\.4"),
    (dict(experts=4, top_k=0), r"--top-k must lie in 1\.\.4"),
    (dict(experts=0, top_k=1), r"--experts must lie in 1\.\.65536, not 0"),
    (dict(experts=10**9, top_k=1), r"--experts must lie in 1\.\.65536, not 1000000000"),
    (dict(experts="4", top_k=2), "--experts must be an integer, not '4'"),
    (dict(experts=4, top_k=True), "--top-k must be an integer, not True"),
    (dict(experts=4, top_k=2, seed=1.5), "--seed must be an integer"),
    (dict(experts=4, top_k=2, drop_ratio=1.5, method="drop"), r"--drop-ratio must lie in \(0, 1\]"),
    (dict(experts=4, top_k=2, drop_ratio=0.0, method="drop"), r"--drop-ratio must lie in \(0, 1\]"),
    (dict(experts=4, top_k=2, drop_ratio="0.5", method="drop"), "--drop-ratio must be a number"),
    (dict(experts=4, top_k=2, drop_ratio=0.3), "--drop-ratio applies to --method drop only"),
    (dict(experts=4, top_k=2, router_std=float("nan")), "--router-std must be a finite number"),
    (dict(experts=4, top_k=2, router_std=float("inf")), "--router-std must be a finite number"),
    (dict(experts=4, top_k=2, router_std=0.0), "--router-std must be a finite number above 0"),
    (dict(experts=4, top_k=2, router_std=-0.02), "--router-std must be a finite number above 0"),
    (dict(experts=4, top_k=2, router="zero", router_std=0.02), "no effect with --router zero"),
    (dict(experts=4, top_k=2, method="copying"), "--method 'copying' is not one of"),
])
def test_inconsistent_settings_are_refused(spec, message):
    with pytest.raises(MoekitError, match=message):
        UpcycleSpec(**spec)


def test_the_drop_ratio_defaults_for_drop_only():
    assert UpcycleSpec(4, 2, method="drop").drop_ratio == 0.5
    assert UpcycleSpec(4, 2).drop_ratio is None


@pytest.mark.parametrize("options,option", [
    (["--drop-ratio", "0.3"], "--drop-ratio"),
    (["--granularity", "2"], "--granularity"),
    (["--method", "granular"], "--granularity"),
    (["--router", "zero", "--router-std", "0.1"], "--router-std"),
    (["--router-std", "nan"], "--router-std"),
    (["--top-k", "5"], "--top-k"),
])
def test_cli_refuses_options_the_method_would_ignore_or_cannot_use(options, option,
                                                                    dense_checkpoints, tmp_path,
                                                                    capsys):
    args = ["upcycle", str(dense_checkpoints["llama"]), str(tmp_path / "moe"), "--experts", "4",
            "--top-k", "2", *options]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit: error: ") and option in err and err.count("\n") == 1
    assert not (tmp_path / "moe").exists()


def test_a_router_std_from_config_must_be_usable(dense_checkpoints, tmp_path):
    dense = Path(shutil.copytree(dense_checkpoints["llama"], tmp_path / "dense"))
    config = json.loads((dense / "config.json").read_text())
    for bad in (0.0, -0.02, "0.02", None):
        (dense / "config.json").write_text(json.dumps({**config, "initializer_range": bad}))
        with pytest.raises(MoekitError, match="initializer_range is .*give one with --router-std"):
            upcycle(dense, tmp_path / "moe", UpcycleSpec(4, 2), dry_run=True)
    given = upcycle(dense, tmp_path / "moe", UpcycleSpec(4, 2, router_std=0.5), dry_run=True)
    assert "router random (std 0.5)" in given.summary()
    zero = upcycle(dense, tmp_path / "moe", UpcycleSpec(4, 2, router="zero"), dry_run=True)
    assert "router zero, scaling" in zero.summary()
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("std,fault", [(1e300, "infinite"), (1e38, "infinite"),
                                       (1e-300, "rounded to zero")])
def test_a_router_std_whose_rows_its_dtype_cannot_hold_is_refused(std, fault, dense_checkpoints,
                                                                   tmp_path):
    """Rows drawn with it would be infinite (NaN logits) or all zero (ties decide top-k):
    the summary's claims would not hold for what was written."""
    dense = Path(shutil.copytree(dense_checkpoints["llama"], tmp_path / "dense"))
    with pytest.raises(MoekitError, match=re.escape(f"--router-std {std:g} would draw router "
                                                    f"rows that are {fault} in F32")):
        upcycle(dense, tmp_path / "moe", UpcycleSpec(4, 2, router_std=std))
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "initializer_range": std}))
    with pytest.raises(MoekitError, match=re.escape(f"initializer_range {std:g} would draw router "
                                                    f"rows that are {fault}")):
        upcycle(dense, tmp_path / "moe", UpcycleSpec(8, 4, "granular", 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_a_float16_model_bounds_the_router_std_by_float16(dense_checkpoints):
    dense = {k: v.half() for k, v in load_all(dense_checkpoints["llama"]).items()}
    with pytest.raises(MoekitError, match="infinite in F16"):
        upcycle_state_dict(dense, UpcycleSpec(4, 2, router_std=1e4))
    with pytest.raises(MoekitError, match="rounded to zero in F16"):
        upcycle_state_dict(dense, UpcycleSpec(4, 2, router_std=1e-6))
    router = upcycle_state_dict(dense, UpcycleSpec(4, 2, router_std=1e3))[
        "model.layers.0.block_sparse_moe.gate.weight"]
    assert router.dtype == torch.float16 and torch.isfinite(router).all()


def test_integer_mlp_weights_are_refused(dense_checkpoints):
    dense = load_all(dense_checkpoints["llama"])
    dense = {k: v.to(torch.int8) if ".mlp." in k else v for k, v in dense.items()}
    with pytest.raises(PlanError, match="the MLP weights are I8; moekit upcycles floating-point"):
        upcycle_state_dict(dense, UpcycleSpec(4, 2))


def test_a_dense_config_naming_an_expert_count_cannot_contradict_the_target(dense_checkpoints,
                                                                           tmp_path):
    """Mixtral reads num_experts as an alias of num_local_experts: a dense config that
    carries one must not leave it beside the count moekit writes."""
    dense = Path(shutil.copytree(dense_checkpoints["llama"], tmp_path / "dense"))
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "num_experts": 3,
                                                   "num_local_experts": 3}))
    upcycle(dense, tmp_path / "moe", UpcycleSpec(4, 2))
    written = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert written["num_local_experts"] == 4 and "num_experts" not in written
    assert moekit_inspect(tmp_path / "moe").n_experts == 4


def test_the_summary_notes_a_down_projection_multiple_its_dtype_rounds(dense_checkpoints):
    """Qwen2-MoE's shared expert halves the routed experts' share: G=2 gives down x 1
    (exact), G=3 down x 1.5, which BF16 rounds."""
    from moekit.conversion import state_dict_meta
    from moekit.upcycling.planner import build_upcycle_plan

    dense = {k: v[:48] if k.endswith(("gate_proj.weight", "up_proj.weight"))
             else v[:, :48] if k.endswith("down_proj.weight") else v
             for k, v in load_all(dense_checkpoints["qwen2"]).items()}
    meta = state_dict_meta({k: v.bfloat16() for k, v in dense.items()})
    config = {"model_type": "qwen2"}
    even = build_upcycle_plan(meta, config, UpcycleSpec(8, 4, "granular", 2), "dense")
    odd = build_upcycle_plan(meta, config, UpcycleSpec(6, 3, "granular", 3), "dense")
    assert even.preserved()[0] and "rounded" not in even.preserved()[1]
    assert odd.preserved() == (True, odd.spec.preserves_function()[1] + "; the routed "
                               "down_proj is 1.5 x the dense one, rounded once to BF16")
    assert "rounded once to BF16" in odd.summary()


SUMMARISED = {
    "copy": (UpcycleSpec(4, 2), True),
    "granular virtual groups": (UpcycleSpec(8, 4, "granular", 2), True),
    "granular random router": (UpcycleSpec(8, 4, "granular", 2, router="random"), False),
    "granular megatron scaling": (UpcycleSpec(8, 4, "granular", 2, scaling="megatron"), False),
    "drop": (UpcycleSpec(4, 2, "drop", drop_ratio=0.25), False),
}


@pytest.mark.parametrize("name", list(SUMMARISED))
def test_the_summary_says_preserved_exactly_when_the_written_model_computes_the_dense_function(
        name, dense_checkpoints, dense_logits, tmp_path):
    spec, expected = SUMMARISED[name]
    summary = upcycle(dense_checkpoints["llama"], tmp_path / "moe", spec).summary()
    claimed = "dense function preserved: yes" in summary
    logits = samples.logits(tmp_path / "moe", samples.sample_input(96))
    same = torch.allclose(logits, dense_logits["llama"], rtol=0, atol=1e-5)
    assert claimed == same == expected


def test_bad_inputs_are_refused_and_nothing_is_written(dense_checkpoints, family_checkpoints,
                                                       tmp_path):
    spec = UpcycleSpec(experts=4, top_k=2)
    with pytest.raises(MoekitError, match="already has experts"):
        upcycle(family_checkpoints["mixtral"], tmp_path / "a", spec)
    with pytest.raises(MoekitError, match="mixtral cannot hold a dense 'qwen3'"):
        upcycle(dense_checkpoints["qwen3"], tmp_path / "a", UpcycleSpec(4, 2, target="mixtral"))
    with pytest.raises(MoekitError, match="has no shared expert"):
        upcycle(dense_checkpoints["qwen3"], tmp_path / "a", UpcycleSpec(4, 2, shared_expert=True))
    with pytest.raises(PlanError, match="not divisible by the granularity 3"):
        upcycle(dense_checkpoints["llama"], tmp_path / "a",
                UpcycleSpec(6, 3, method="granular", granularity=3))
    (tmp_path / "exists").mkdir()
    with pytest.raises(MoekitError, match="already exists"):
        upcycle(dense_checkpoints["llama"], tmp_path / "exists", spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_a_missing_mlp_tensor_is_named_with_its_layer(dense_checkpoints, tmp_path):
    dense = Path(shutil.copytree(dense_checkpoints["llama"], tmp_path / "dense"))
    index = json.loads((dense / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (dense / "model.safetensors.index.json").write_text(json.dumps(index))
    before = tree_digest(dense)
    with pytest.raises(MoekitError) as err:
        upcycle(dense, tmp_path / "moe", UpcycleSpec(4, 2))
    assert "model.layers.2.mlp.up_proj.weight" in str(err.value)
    assert tree_digest(dense) == before and not (tmp_path / "moe").exists()


def test_cli_upcycle_dry_run_and_run(dense_checkpoints, tmp_path, capsys):
    args = ["upcycle", str(dense_checkpoints["qwen2"]), str(tmp_path / "moe"), "--experts", "4",
            "--top-k", "2", "--method", "granular", "--granularity", "2"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dense -> qwen2_moe" in out and "dense function preserved: yes" in out
    assert "shared expert" in out and not (tmp_path / "moe").exists()
    assert main(args) == 0
    assert (tmp_path / "moe" / "config.json").exists()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err



@pytest.mark.parametrize("layer", ["02", "\N{FULLWIDTH DIGIT TWO}"])
def test_a_layer_number_written_other_than_canonically_is_refused(layer):
    tensors = {f"model.layers.{n}.mlp.{p}_proj.weight": TensorInfo("", "", (8, 4), "F32", 0)
               for n in ("2", layer) for p in ("gate", "up", "down")}
    with pytest.raises(MoekitError, match="layer number other than as ASCII digits"):
        dense_mlps(tensors, UpcycleSpec(4, 2), "dense")


@pytest.mark.parametrize("spec,config,found", [
    (None, None, "the upcycling spec is a NoneType; expected a moekit.UpcycleSpec"),
    ({"experts": 4, "top_k": 2}, None, "the upcycling spec is a dict"),
    (UpcycleSpec(4, 2), [("model_type", "llama")], "the dense config is a list"),
    (UpcycleSpec(4, 2), "llama", "the dense config is a str"),
])
def test_upcycling_arguments_of_the_wrong_type_are_named(spec, config, found, dense_checkpoints):
    dense = load_all(dense_checkpoints["llama"])
    with pytest.raises(MoekitError, match=found):
        upcycle_state_dict(dense, spec, config)
    if isinstance(spec, dict):
        from moekit.upcycling.megatron import upcycle_state_dict as megatron_upcycle

        with pytest.raises(MoekitError, match="the upcycling spec is a"):
            megatron_upcycle(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), spec)
