"""Multimodal MoE models whose towers their consumers convert on load in ways moekit's
renames do not hold: DeepSeek-OCR-2, Unlimited-OCR, Inkling, Nemotron-H-Omni and
Nemotron-3.5-Transcribe. Their text experts convert between hf and vllm
(test_families.py); ``--to transformers`` and ``--to nemo`` are refused, and each reason is
checked here against the consumer's own code: transformers' state dict, NeMo AutoModel's
registry and adapters. Nemotron-3.5-Transcribe's Hub files, whose experts are named as the
refused nemo layout names them, are still read."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from moekit.cli import main
from moekit.layouts import TRANSFORMERS, family_of_model_type

from .conftest import load_all, same_bytes
from .tiny_families import per_expert_pieces, saved_multimodal

TYPES = ("deepseek_ocr2", "unlimited_ocr", "inkling_mm_model", "nemotron_h_omni",
         "nemo_speechlm")
NO_NEMO_MODEL = ("deepseek_ocr2", "unlimited_ocr", "nemo_speechlm")
"""Model types NeMo AutoModel 0.7 has no model of: it loads them through transformers."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model type -> (its tiny model, its save_pretrained folder), built on first use."""
    return saved_multimodal(tmp_path_factory.mktemp("refused"))


def _refused(src, layout: str, tmp_path, capsys) -> str:
    """The message of ``--to layout`` refused (exit 2, nothing written)."""
    out = tmp_path / layout
    assert main(["convert", str(src), str(out), "--to", layout]) == 2
    err = capsys.readouterr().err
    assert f"{layout} layout of" in err and "is refused" in err, err
    assert "Traceback" not in err and not out.exists()
    return err


@pytest.mark.parametrize("model_type", TYPES)
def test_transformers_is_refused_where_its_state_dict_names_towers_otherwise(
        model_type, saved, tmp_path, capsys):
    """transformers' state dict holds tensors outside the experts under names no file key
    takes under moekit's renames (the towers renamed, split or joined on load): refused,
    naming what transformers converts."""
    model, src = saved(model_type)
    family = family_of_model_type(model_type)
    renamed = {TRANSFORMERS.from_hf_key(k, family) for k in load_all(src)}
    beyond = [k for k in model.state_dict() if ".experts." not in k and k not in renamed]
    assert beyond
    assert family.unconverted["transformers"] in _refused(src, "transformers", tmp_path, capsys)


@pytest.fixture(scope="module")
def nemo_models() -> set[str]:
    """The architectures NeMo AutoModel 0.7's registry has a model of, read in a process of
    their own: importing the registry registers NeMo's configs with transformers, in place
    of transformers' own, for the rest of the process."""
    code = ("from nemo_automodel._transformers.registry import ModelRegistry; "
            "print(*ModelRegistry.supported_models)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()
    assert "NemotronH_Omni_Reasoning_V3" in found and "InklingForConditionalGeneration" in found
    return set(found)


@pytest.mark.parametrize("model_type", NO_NEMO_MODEL)
def test_nemo_is_refused_where_nemo_automodel_has_no_model(model_type, saved, nemo_models,
                                                          tmp_path, capsys):
    """NeMo AutoModel 0.7's registry names no model for the architecture, so it loads the
    checkpoint through transformers (refused above for its towers): nemo is refused too."""
    model, src = saved(model_type)
    assert type(model).__name__ not in nemo_models
    err = _refused(src, "nemo", tmp_path, capsys)
    assert "has no model of" in err and family_of_model_type(model_type).unconverted["nemo"] in err


def _moe_config(text, **settings) -> object:
    """NeMo AutoModel's MoE settings for ``text``, a text model's config (``settings``: the
    expert activation where it is not the default SwiGLU)."""
    from nemo_automodel.components.moe.config import MoEConfig

    return MoEConfig(dim=text.hidden_size, inter_dim=text.intermediate_size,
                     moe_inter_dim=text.moe_intermediate_size,
                     n_routed_experts=text.n_routed_experts, n_shared_experts=0,
                     n_activated_experts=text.num_experts_per_tok, n_expert_groups=0,
                     n_limited_groups=0, train_gate=True, gate_bias_update_factor=0.0,
                     aux_loss_coeff=0.0, score_func="softmax", route_scale=1.0,
                     norm_topk_prob=False, dtype=torch.float32, **settings)


def _backend():
    from nemo_automodel.components.models.common import BackendConfig

    return BackendConfig(attn="sdpa", linear="torch", rms_norm="torch")


def test_inkling_nemo_is_refused_as_nemos_adapter_transposes_the_shared_experts(
        saved, tmp_path, capsys):
    """NeMo AutoModel 0.7's InklingStateDictAdapter holds each shared expert's
    shared_w13_weight transposed and de-interleaved as shared_experts.gate_up_proj: not
    the files' bytes under another name, so nemo is refused, saying so."""
    from nemo_automodel.components.models.inkling.state_dict_adapter import (
        InklingStateDictAdapter)

    model, src = saved("inkling_mm_model")
    hf = load_all(src)
    adapter = InklingStateDictAdapter(model.config, _moe_config(model.config.text_config),
                                      _backend())
    held = adapter.from_hf(dict(hf))
    ours = hf["model.llm.layers.1.mlp.shared_experts.shared_w13_weight"]
    theirs = held["model.language_model.layers.1.mlp.shared_experts.gate_up_proj"]
    assert theirs.numel() == ours.numel() and not same_bytes(theirs.reshape(ours.shape), ours)
    assert "de-interleaves the shared experts' shared_w13_weight" in _refused(
        src, "nemo", tmp_path, capsys)


def test_nemotron_h_omni_nemo_is_refused_as_nemos_adapter_splits_the_vision_qkv(
        saved, tmp_path, capsys):
    """NeMo AutoModel 0.7's NemotronOmniStateDictAdapter, as its model sets it up for
    NemotronH_Omni_Reasoning_V3 (the transformers-native RADIO tower), splits the vision
    tower's attn.qkv into query, key and value: nemo is refused, saying so."""
    from nemo_automodel.components.models.nemotron_omni.state_dict_adapter import (
        NemotronOmniStateDictAdapter)

    model, src = saved("nemotron_h_omni")
    hf = load_all(src)
    text = model.config.text_config
    adapter = NemotronOmniStateDictAdapter(
        model.config, text, _moe_config(text, expert_activation="relu2"), _backend(),
        dtype=torch.float32, vision_uses_native_radio=True)
    held = adapter.from_hf(dict(hf))
    assert any(k.endswith("attn.qkv.weight") for k in hf)
    assert not any("attn.qkv" in k for k in held)
    assert any("attention.attention.query" in k for k in held)
    assert "splits the RADIO vision tower's attn.qkv" in _refused(src, "nemo", tmp_path, capsys)


def _as_nemo_export(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Nemotron-3.5-Transcribe's save_pretrained tensors as its Hub files (NVIDIA's NeMo
    export) hold them: each layer's routed experts grouped, transposed, as
    ``mixer.experts.gate_and_up_projs`` [E,H,I] (up alone: non-gated) and ``down_projs``
    [E,I,H], which transformers 5.24 transposes on load (conversion_mapping.py
    "nemo_speechlm")."""
    hub, experts = per_expert_pieces(
        saved, re.compile(r"(.+\.mixer\.experts)\.(\d+)\.(up|down)_proj\.weight"))
    for module, pieces in experts.items():
        count = len(pieces) // 2
        for name, piece in (("gate_and_up_projs", "up"), ("down_projs", "down")):
            hub[f"{module}.{name}"] = torch.stack(
                [pieces[(e, piece)].T for e in range(count)]).contiguous()
    return hub


def test_nemotron_3_5_transcribe_hub_files_are_read(saved, tmp_path, capsys):
    """The Hub's NeMo export (experts grouped as nemo's gate_and_up_projs and down_projs,
    which transformers loads into the model's state dict, as it loads save_pretrained's
    per-expert files) is read: into save_pretrained's files with ``--to hf``, byte for
    byte; nemo stays refused as a destination."""
    from safetensors.torch import save_file

    model, src = saved("nemo_speechlm")
    original = load_all(src)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(_as_nemo_export(original), hub / "model.safetensors", metadata={"format": "pt"})
    (hub / "config.json").write_text((src / "config.json").read_text())
    loaded, info = type(model).from_pretrained(hub, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = model.state_dict()
    assert [k for k, v in loaded.state_dict().items() if not same_bytes(v, expected[k])] == []
    assert main(["convert", str(hub), str(tmp_path / "hf"), "--to", "hf"]) == 0
    written = load_all(tmp_path / "hf")
    assert written.keys() == original.keys()
    assert [k for k in original if not same_bytes(original[k], written[k])] == []
    assert "refused as a destination" in _refused(hub, "nemo", tmp_path, capsys)
