"""The nemo layout is what NeMo AutoModel holds: checked by NeMo AutoModel's own state-dict
adapters (nemo_automodel 0.7.0, which scripts/setup.sh installs without its dependencies;
the adapters import without them and run on the CPU).

For every model type NeMo AutoModel has an adapter for and transformers can build as a
tiny model (multimodal ones included): moekit's nemo tensors equal the adapter's
``from_hf`` of the same HF checkpoint (in its Hub form), name for name and byte for byte,
and the adapter's ``to_hf`` of moekit's nemo output gives back the HF checkpoint.
(NeMo AutoModel has no adapter for Qwen2-MoE, OLMoE, Mixtral, Phi-MoE or Llama 4, whose
models it builds through transformers.)
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from moekit import convert, samples
from moekit.cli import main

from .conftest import load_all, same_bytes
from .test_families import on_the_hub
from .tiny_families import build, build_multimodal

from nemo_automodel.components.models.common import BackendConfig
from nemo_automodel.components.moe.config import MoEConfig

TINY: dict[str, Any] = {}
"""The tiny config ``tests/tiny_families.py`` gives the model type (as its per-family tests
build it)."""

_DSA = dict(head_dim=4, num_key_value_heads=4, moe_intermediate_size=16,
            num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, index_head_dim=8,
            index_n_heads=2, first_k_dense_replace=1, n_routed_experts=6,
            mlp_layer_types=["dense", "sparse", "sparse"])
"""A tiny DeepSeek-V3.2-style config (MLA with an indexer, one dense layer first)."""

ADAPTERS: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    # model type -> (NeMo AutoModel adapter; how its model's MoEConfig differs from a plain
    # SwiGLU one, the values each model.py of nemo_automodel 0.7 sets; the tiny config,
    # None for moekit's own sample, TINY for tiny_families')
    "qwen3_moe": ("qwen3_moe.Qwen3MoeStateDictAdapter", {}, None),
    "deepseek_v3": ("deepseek_v3.DeepSeekV3StateDictAdapter", {}, None),
    "gpt_oss": ("gpt_oss.GPTOSSStateDictAdapter",
                dict(expert_bias=True, router_bias=True, expert_activation="quick_geglu"),
                None),
    "nemotron_h": ("nemotron_v3.NemotronV3StateDictAdapter", dict(expert_activation="relu2"),
                   None),
    "glm4_moe": ("glm4_moe.Glm4MoeStateDictAdapter", {},
                 dict(moe_intermediate_size=16, num_experts_per_tok=2, n_group=1, topk_group=1,
                      first_k_dense_replace=1, n_routed_experts=6)),
    "deepseek_v32": ("deepseek_v32.DeepSeekV32StateDictAdapter", {}, _DSA),
    "glm_moe_dsa": ("glm_moe_dsa.GlmMoeDsaStateDictAdapter", {}, _DSA),
    "mimo_v2_flash": ("mimo_v2_flash.MiMoV2FlashStateDictAdapter", {},
                      dict(head_dim=8, moe_intermediate_size=16, num_experts_per_tok=2,
                           n_group=1, topk_group=1, v_head_dim=8, n_routed_experts=6,
                           mlp_layer_types=["dense", "sparse", "sparse"])),
    "minimax_m2": ("minimax_m2.MiniMaxM2StateDictAdapter", {},
                   dict(head_dim=8, num_experts_per_tok=2, num_local_experts=6,
                        bos_token_id=1, eos_token_id=2)),
    "ernie4_5_moe": ("ernie4_5.Ernie4_5_MoeStateDictAdapter", {},
                     dict(moe_intermediate_size=16, num_experts_per_tok=2, moe_num_experts=6)),
    "qwen3_next": ("qwen3_next.Qwen3NextStateDictAdapter", {},
                   dict(head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                        num_experts_per_tok=2, num_experts=6)),
    "hy_v3": ("hy_v3.HYV3StateDictAdapter", {},
              dict(head_dim=8, moe_intermediate_size=16, num_experts_per_tok=2, num_experts=6,
                   mlp_layer_types=["dense", "sparse", "sparse"])),
    "glm4_moe_lite": ("glm4_moe.Glm4MoeStateDictAdapter", {}, TINY),
    "kimi_linear": ("kimi_linear.KimiLinear48BStateDictAdapter", {}, TINY),
    "laguna": ("laguna.LagunaStateDictAdapter", {},
               dict(head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                    num_experts_per_tok=2, num_experts=6,
                    mlp_layer_types=["dense", "sparse", "sparse"])),
}
"""Every model type NeMo AutoModel 0.7 has a state-dict adapter for and transformers 5.24
builds as a tiny causal LM (NeMo reads glm4_moe_lite with GLM-4.5's adapter). Not here:
the adapters that read a release's own names rather than those transformers saves
(DeepSeek-V4's ``layers.N.ffn``, ``embed`` and ``head``; MiniMax-M3's per-expert
``block_sparse_moe.experts.E.w1``; Inkling's ``w13_weight``; Qwen3.5-MoE's, tested as
multimodal below); Step-3.5, Mistral 4 and Ling-2, which transformers 5.24 cannot
build; Gemma 4, whose adapter multiplies router.per_expert_scale into the experts, so
that moekit refuses nemo for it (test_families.py)."""


MULTIMODAL_ADAPTERS = {"qwen3_vl_moe": "qwen3_vl_moe.Qwen3VLMoeStateDictAdapter",
                       "qwen3_omni_moe": "qwen3_omni_moe.Qwen3OmniMoeStateDictAdapter",
                       "qwen3_5_moe": "qwen3_5_moe.Qwen3_5MoeStateDictAdapter",
                       "minimax_m3_vl": "minimax_m3_vl.MiniMaxM3VLStateDictAdapter",
                       "step3p7": "step3p7.Step3p7StateDictAdapter",
                       "kimi_k25": "kimi_k25_vl.KimiK25VLStateDictAdapter"}
"""The multimodal model types NeMo AutoModel 0.7 has an adapter for and transformers 5.24
builds tiny (given their whole config), whose Hub form moekit reads as the adapter does
(Qwen3.5-MoE's adapter reads only its Hub files' grouped experts, Kimi-K2.5's only its Hub
files' names). Not here: Mistral-Large-4, which NeMo AutoModel 0.7 has no model of (its
Mistral 4 adapter is Mistral-Small-4's), so that moekit refuses nemo for it (below)."""
IN_BF16 = ("kimi_k25",)
"""Model types whose adapter's ``from_hf`` casts every floating tensor to bf16 (Kimi-K2.5's,
the dtype of its Hub files), checked on a model saved in bf16. A file's float32 tensor (a
score-correction bias) that adapter rounds to bf16, where moekit, which rounds nothing,
keeps it float32."""


def _adapter(family: str, model) -> Any:
    """NeMo AutoModel's adapter for ``family``, set up as its model sets it up (the sizes
    from a multimodal model's text config)."""
    path, overrides = (ADAPTERS[family][:2] if family in ADAPTERS
                       else (MULTIMODAL_ADAPTERS[family], {}))
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(
        f"nemo_automodel.components.models.{module}.state_dict_adapter"), name)
    config = model.config.get_text_config()
    experts = next(getattr(config, k) for k in ("num_experts", "num_local_experts",
                                                  "n_routed_experts", "moe_num_experts")
                   if hasattr(config, k))
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    dense = getattr(config, "intermediate_size", inter)  # Qwen3.5-MoE's text model has none
    moe = MoEConfig(dim=config.hidden_size, inter_dim=dense,
                    moe_inter_dim=inter, n_routed_experts=experts, n_shared_experts=0,
                    n_activated_experts=config.num_experts_per_tok, n_expert_groups=0,
                    n_limited_groups=0, train_gate=True, gate_bias_update_factor=0.0,
                    aux_loss_coeff=0.0, score_func="softmax", route_scale=1.0,
                    norm_topk_prob=False, dtype=torch.float32, **overrides)
    # attn="sdpa": with TransformerEngine attention the GPT-OSS adapter also renames the
    # attention sinks to TE's softmax_offset, a module name, not an expert layout.
    return cls(model.config, moe, BackendConfig(attn="sdpa", linear="torch", rms_norm="torch"),
               dtype=torch.float32)


@pytest.mark.parametrize("family", ADAPTERS)
def test_nemo_layout_is_what_nemo_automodels_adapter_gives(family, family_checkpoints,
                                                          family_models, tmp_path):
    settings = ADAPTERS[family][2]
    if settings is None:
        source, model = family_checkpoints[family], family_models[family]
    elif settings is TINY:
        model = build(family)
        source = samples.save_model(model, tmp_path / family)
    else:
        model = samples.build_model(family, **settings)
        source = samples.save_model(model, tmp_path / family)
    convert(source, tmp_path / "nemo", to="nemo")
    hf, ours = load_all(source), load_all(tmp_path / "nemo")
    adapter = _adapter(family, model)

    theirs = adapter.from_hf(dict(hf))
    assert sorted(ours) == sorted(theirs)
    different = [k for k in ours if not same_bytes(ours[k], theirs[k])]
    assert not different, different[:5]

    back = adapter.to_hf(dict(ours))
    assert sorted(back) == sorted(hf)
    different = [k for k in hf if not same_bytes(hf[k], back[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("family", MULTIMODAL_ADAPTERS)
def test_multimodal_nemo_layout_is_what_the_adapter_gives_for_the_hub_files(family, tmp_path):
    """A multimodal checkpoint in its Hub form (Qwen3-VL-MoE's grouped experts transposed
    from save_pretrained's: the form NeMo's adapter renames without moving a byte;
    Kimi-K2.5's text layers named ``layers`` where save_pretrained writes ``blocks``):
    moekit's nemo, of the Hub files and of save_pretrained's alike, is the adapter's
    ``from_hf`` of the Hub files, and its ``to_hf`` gives them back."""
    model = build_multimodal(family)
    if family in IN_BF16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "saved")
    hub = on_the_hub(family, load_all(tmp_path / "saved"))
    (tmp_path / "hub").mkdir()
    save_file(hub, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    adapter = _adapter(family, model)
    theirs = adapter.from_hf(dict(hub))
    for source in ("hub", "saved"):
        convert(tmp_path / source, tmp_path / f"{source}-nemo", to="nemo")
        ours = load_all(tmp_path / f"{source}-nemo")
        assert sorted(ours) == sorted(theirs)
        assert [k for k in ours if not same_bytes(ours[k], theirs[k])] == []
    back = adapter.to_hf(dict(load_all(tmp_path / "hub-nemo")))
    assert sorted(back) == sorted(hub)
    assert [k for k in hub if not same_bytes(hub[k], back[k])] == []


def test_mistral_large4_nemo_layout_is_refused_as_nemo_automodel_has_no_model_of_it(
        tmp_path, capsys):
    """NeMo AutoModel 0.7's only Mistral MoE model, Mistral 4 (with
    Mistral4MultimodalStateDictAdapter), declines a Mistral-Large-4 config
    (``supports_config``: Mistral-Small-4's mistral4 text model only), and its registry
    names no model for Mistral-Large-4's architecture (not imported here: importing it
    registers NeMo's configs with transformers for the rest of the process): NeMo builds it
    through transformers, which permutes the vision tower's attention on load. So ``--to
    nemo`` is refused, saying so, and nothing is written."""
    from nemo_automodel.components.models.mistral4.model import (
        Mistral3ForConditionalGeneration)

    model = build_multimodal("mistral_large4")
    model.save_pretrained(tmp_path / "src")
    assert not Mistral3ForConditionalGeneration.supports_config(model.config)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "nemo"]) == 2
    err = capsys.readouterr().err
    assert "nemo layout of mistral_large4 is refused as a destination" in err
    assert "no model of Mistral-Large-4" in err and "use hf, vllm" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("packed_layers", [r"\d+", "2"], ids=["every-layer", "layer-2"])
def test_kimi_k25_hub_files_with_int4_experts_are_refused(packed_layers, tmp_path, capsys):
    """Kimi-K2.5's Hub files hold the routed experts packed by compressed-tensors: INT4 in
    int32 words, ``weight_packed`` with ``weight_scale`` and ``weight_shape`` in place of
    each ``weight`` (made here by NeMo AutoModel's own ``quantize_to_int4``, the form its
    adapter dequantizes on load). moekit reads no packed experts: inspect and convert
    refuse them, naming a packed tensor, and nothing is written; so too where the source
    layout is given, and in a copy whose other layers' experts are dequantized."""
    from nemo_automodel.components.models.kimi_k25_vl.state_dict_adapter import (
        quantize_to_int4)

    model = build_multimodal("kimi_k25").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "saved")
    packed = {}
    for key, tensor in on_the_hub("kimi_k25", load_all(tmp_path / "saved")).items():
        if re.search(rf"\.layers\.{packed_layers}\.mlp\.experts\.\d+\.\w+\.weight$", key):
            base = key.removesuffix(".weight")
            packed.update(zip((f"{base}.weight_packed", f"{base}.weight_scale",
                               f"{base}.weight_shape"), quantize_to_int4(tensor)))
        else:
            packed[key] = tensor
    (tmp_path / "int4").mkdir()
    save_file(packed, tmp_path / "int4" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "int4" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    convert_to = ["convert", str(tmp_path / "int4"), str(tmp_path / "out"), "--to", "nemo"]
    for command in (["inspect", str(tmp_path / "int4")], convert_to, [*convert_to, "--from", "hf"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert re.search(r"holds its experts packed by compressed-tensors \(language_model\."
                         rf"model\.layers\.{packed_layers}\.mlp\.experts\.\d+\.\w+\."
                         r"weight_packed,", err), err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_sample_models_are_transformers_own_once_nemo_automodels_registry_is_imported(tmp_path):
    """Importing NeMo AutoModel 0.7's model registry registers its config classes with
    AutoConfig in place of transformers' (HY-V3's among them, which lacks attributes
    transformers' model reads): ``samples.build_model`` still builds transformers' own
    config and model, and ``samples.logits`` loads it back, giving its logits. In a process
    of its own, as the import holds for the whole process."""
    code = ("import sys, torch, transformers; "
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "from nemo_automodel._transformers.registry import ModelRegistry; "
            "from moekit import samples; "
            "model = samples.build_model('hy_v3', num_experts=4, num_experts_per_tok=2, "
            "moe_intermediate_size=16); "
            "ids = samples.sample_input(model.config.vocab_size); "
            "path = samples.save_model(model, sys.argv[1]); "
            "print(CONFIG_MAPPING['hy_v3'] is transformers.HYV3Config, "
            "type(model.config) is transformers.HYV3Config, "
            "type(model) is transformers.HYV3ForCausalLM, "
            "torch.equal(samples.logits(path, ids), model(ids).logits))")
    shown = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hy_v3")],
                           capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert shown.stdout.split() == ["False", "True", "True", "True"], shown.stderr[-2000:]


def test_a_score_correction_bias_nemo_squeezes_must_have_one_row(tmp_path, capsys):
    """NeMo holds ERNIE-4.5's moe_statics.e_score_correction_bias [1, E] as [E]: a file
    whose bias has two rows (one per modality, as ERNIE-4.5-VL's) is refused by name, as
    dropping a row would lose it."""
    settings = ADAPTERS["ernie4_5_moe"][2]
    source = samples.save_model(samples.build_model("ernie4_5_moe", **settings),
                                tmp_path / "ernie")
    tensors = load_all(source)
    key = "model.layers.1.mlp.moe_statics.e_score_correction_bias"
    tensors[key] = torch.cat([tensors[key], tensors[key]])
    folder = tmp_path / "two-rows"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text((source / "config.json").read_text())
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "nemo"]) == 2
    err = capsys.readouterr().err
    assert f"{key} is [2, 6]" in err and "without its leading dimension" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_gpt_oss_in_nemo_keeps_gate_and_up_interleaved_with_their_biases(family_checkpoints,
                                                                        tmp_path):
    source = family_checkpoints["gpt_oss"]
    convert(source, tmp_path / "nemo", to="nemo")
    hf, nemo = load_all(source), load_all(tmp_path / "nemo")
    block = "model.layers.1.mlp"
    assert same_bytes(nemo[f"{block}.experts.gate_and_up_projs"],
                      hf[f"{block}.experts.gate_up_proj"])
    assert same_bytes(nemo[f"{block}.experts.gate_up_proj_bias"],
                      hf[f"{block}.experts.gate_up_proj_bias"])
    assert same_bytes(nemo[f"{block}.gate.bias"], hf[f"{block}.router.bias"])
    convert(tmp_path / "nemo", tmp_path / "back", to="transformers")
    back = load_all(tmp_path / "back")
    assert all(same_bytes(hf[k], back[k]) for k in hf) and back.keys() == hf.keys()


def test_an_fp8_checkpoint_goes_to_nemo_only_dequantized(tmp_path, capsys):
    from .test_fp8 import fp8_checkpoint

    source = fp8_checkpoint(tmp_path / "fp8", intermediate=200)
    assert main(["convert", str(source), str(tmp_path / "out"), "--to", "nemo"]) == 2
    err = capsys.readouterr().err
    assert "NeMo AutoModel dequantizes FP8" in err and "--dequantize" in err
    assert not Path(tmp_path / "out").exists()
    assert main(["convert", str(source), str(tmp_path / "out"), "--to", "nemo",
                 "--dequantize"]) == 0
    assert not any(k.endswith("scale_inv") for k in load_all(tmp_path / "out"))


def test_a_nemo_file_with_fp8_scale_tensors_is_refused_by_name(family_checkpoints, tmp_path,
                                                              capsys):
    """Grouped ``*_scale_inv`` tensors are no part of NeMo AutoModel's format: a file
    holding them is refused, naming the tensor and why."""
    convert(family_checkpoints["qwen3_moe"], tmp_path / "nemo", to="nemo")
    tensors = load_all(tmp_path / "nemo")
    key = "model.layers.0.mlp.experts.gate_and_up_projs"
    tensors[key + "_scale_inv"] = torch.ones(tensors[key].shape[0], 1, 1)
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text((tmp_path / "nemo" / "config.json").read_text())
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "hf",
                 "--from", "nemo"]) == 2
    err = capsys.readouterr().err
    assert key + "_scale_inv" in err and "NeMo AutoModel dequantizes FP8" in err
    assert "convert the FP8 checkpoint it was made from again" in err
    assert "Traceback" not in err
